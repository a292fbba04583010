"""What `phiforge study` measures on each finished (route, seed) run, the same way for every route.

    setup = prepare_eval(study, dataset_dir, work_dir, train_config)   # once per study
    metrics = evaluate_route(run_or_checkpoint_dir, setup)             # after each run

Every route's final weights are a phiforge checkpoint (LitGPT's are converted by `phiforge litgpt pretrain`),
so one function scores them all, with `phiforge eval`'s library (phiforge.evaluation):
  val_bpb          bits per UTF-8 byte of the whole held-out split (score_dataset: every document scored whole,
                   sliding windows, separators left out)
  cloze_acc        gutenberg-cloze accuracy (make_cloze once per study, evaluate_task per run)
  val_loss         nats per token on the validation windows every route validated on while training (the number
                   `phiforge train` logs at its last validation; val_bpb_windows is its bpb)
The report reads val_bpb and cloze_acc; a key that is absent shows as "-".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phiforge.evaluation import evaluate_task, load_task, make_cloze, score_dataset
from phiforge.study.config import CLOZE_TASK, cloze_path

CLOZE_ITEMS = 500  # at most: the bundled books' held-out Persuasion gives about 330 that pass the filter


@dataclass
class EvalSetup:
    dataset: Path  # the study's prepared phiforge dataset
    seq_len: int
    micro_batch_size: int
    eval_batches: int
    mixture: str | dict | None = None
    device: str = "auto"
    cloze_task: Path | None = None  # the gutenberg-cloze task file, made once per study (EVAL HOOK 1)


def prepare_eval(study, dataset: Path, work: Path, train) -> EvalSetup:
    """The evaluation every run of the study gets; train: the reference route's TrainConfig."""
    setup = EvalSetup(Path(dataset), train.data.seq_len, train.micro_batch_size, train.eval_batches,
                      train.data.mixture, train.device)
    # gutenberg-cloze (phiforge eval make-cloze): made once per study from its held-out documents
    setup.cloze_task = cloze_path(work)
    if not setup.cloze_task.is_file():
        make_cloze(dataset, setup.cloze_task, n_items=CLOZE_ITEMS, seed=0)
    return setup


def evaluate_route(run_dir: Path, setup: EvalSetup) -> dict:
    """Metrics of a run's final checkpoint (or of a checkpoint directory): val_loss, val_bpb and, once issue 12
    is plugged in, cloze_acc."""
    import torch

    from phiforge.data.loader import eval_batches
    from phiforge.model_files import load_checkpoint, resolve_checkpoint
    from phiforge.tokenizer import eot_id, load_tokenizer, token_byte_lengths
    from phiforge.train.distributed import resolve_device
    from phiforge.train.validation import evaluate

    ckpt = resolve_checkpoint(Path(run_dir))
    # every route is scored in the context it trained with
    model = load_checkpoint(ckpt, device=resolve_device(setup.device), eval_context=setup.seq_len)
    tok = load_tokenizer(ckpt)
    batches = eval_batches(setup.dataset, "val", setup.seq_len, setup.micro_batch_size, setup.eval_batches,
                           mixture=setup.mixture)
    val = evaluate(model, batches, token_bytes=torch.tensor(token_byte_lengths(tok), dtype=torch.float64),
                   eot=eot_id(tok))
    out = {"val_loss": val["val_loss"], "val_bpb": val.get("val_bpb"), "val_bpb_on": "validation windows"}
    # `phiforge eval`: bits per byte of the whole held-out split (every document scored whole, sliding windows)
    # and gutenberg-cloze accuracy
    score = score_dataset(model, setup.dataset, "val")
    out.update(val_bpb=score.bpb, val_bpb_on="whole validation split (phiforge eval)",
               val_bpb_windows=val.get("val_bpb"))
    if setup.cloze_task is not None:
        cloze = evaluate_task(model, tok, load_task(CLOZE_TASK, setup.cloze_task, format="cloze"))
        out.update(cloze_acc=cloze["acc"], cloze_ll=cloze.get("ll"))
    return out


def val_bytes_per_token(setup: EvalSetup) -> float:
    """UTF-8 bytes per target token of the validation windows: converts a logged val_loss to bpb (LitGPT's
    curve, whose events have no val_bpb) as val_loss / (ln 2 x bytes per token)."""
    from phiforge.data.loader import eval_batches
    from phiforge.tokenizer import load_tokenizer, token_byte_lengths

    lengths = token_byte_lengths(load_tokenizer(setup.dataset))
    n_bytes = n_tokens = 0
    for _, y in eval_batches(setup.dataset, "val", setup.seq_len, setup.micro_batch_size, setup.eval_batches,
                             mixture=setup.mixture):
        n_bytes += sum(lengths[i] for i in y.flatten().tolist())
        n_tokens += y.numel()
    return n_bytes / n_tokens
