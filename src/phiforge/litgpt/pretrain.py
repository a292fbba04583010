"""`phiforge litgpt pretrain --config F`: train a Phi-2-family model with `litgpt pretrain`, report it like phiforge.

The config uses the same keys as `phiforge train` where they mean the same thing (model, init_from, data.seq_len,
optim, micro_batch_size, grad_accum_steps, max_steps, eval_interval, eval_batches, log_interval, seed), so a
study can hand both trainers one set of hyperparameters. It becomes a `litgpt pretrain` YAML:

    model_config      the LitGPT Config of the phiforge model (convert.config_to_litgpt: phi-2 + overrides)
    data              phiforge.litgpt.datamodule.PhiforgeLitData over `phiforge litgpt prepare` output
    train             global_batch_size = micro_batch_size x grad_accum_steps x devices; max_tokens = max_steps x
                      tokens per step (so LitGPT stops after exactly max_steps optimizer steps); lr_warmup_steps;
                      min_lr = lr x min_lr_ratio; max_norm = grad_clip; max_seq_length = seq_len
    optimizer         torch.optim.AdamW(lr, betas, eps, weight_decay)
    eval              interval = eval_interval, max_iters = eval_batches
    init              init_from (a phiforge checkpoint) -> converted to RUN/initial -> initial_checkpoint_dir

Differences that remain (LitGPT's own choices, documented in docs/litgpt.md): LitGPT always torch.compile()s
the model; its warmup starts at lr 0 (phiforge at lr/warmup); AdamW weight decay applies to every parameter
(phiforge decays matrices only); without init_from it uses GPT-NeoX init (phiforge: N(0, 0.02)); cosine is its
only schedule.

The run directory then looks like a phiforge run: RUN/config.yaml, RUN/metrics.jsonl (start, train, eval, end
events, from LitGPT's CSV log), RUN/checkpoints/step-N (the final weights converted to a phiforge checkpoint)
and RUN/latest, so `phiforge generate --checkpoint RUN` works. LitGPT's own files stay in RUN/litgpt/ and its
console output in RUN/litgpt.log.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from phiforge.config import check_range, to_dict
from phiforge.errors import ConfigError, PhiforgeError
from phiforge.litgpt.convert import config_to_litgpt, write_litgpt_checkpoint
from phiforge.litgpt.data import check_manifest_fits, read_manifest
from phiforge.model import count_params_meta
from phiforge.tokenizer import check_vocab_fits
from phiforge.train.config import RunConfig, model_config_from_spec
from phiforge.train.metrics import perplexity
from phiforge.train.precision import resolve_precision

PRECISION = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true"}


@dataclass
class LitDataConfig:
    dir: str = "data/litgpt"  # output of `phiforge litgpt prepare`
    seq_len: int = 256
    seed: int = 0  # litdata's shuffling seed (only with shuffle: true; the written order came from prepare's --seed)
    shuffle: bool = False  # false: phiforge's order, as written by `phiforge litgpt prepare`
    # DataLoader workers. 1 (default): one background producer building 2 batches ahead, pinned on CUDA, which is
    # phiforge's own data path (data.prefetch.Prefetcher); 0 reads on the training thread, with no prefetch
    num_workers: int = 1


@dataclass
class LitPretrainConfig(RunConfig):
    """`phiforge litgpt pretrain`'s config: train.config.RunConfig's keys (model: preset + Phi2Config overrides, no
    moe/xattn; init_from: else LitGPT's GPT-NeoX init; save_interval: LitGPT checkpoints, 0: only the final one)
    and LitGPT's own."""

    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", *PRECISION)

    data: LitDataConfig = field(default_factory=LitDataConfig)
    out_dir: str = "runs/litgpt"
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 1000
    initial_validation: bool = True  # validate before the first step (as phiforge does)
    devices: int = 1  # GPUs per node (LitGPT uses FSDP when devices x num_nodes > 1)
    num_nodes: int = 1
    litgpt_args: list[str] = field(default_factory=list)  # extra `litgpt pretrain` arguments, e.g. [--train.max_time, "3600"]
    echo: bool = True  # copy LitGPT's console output to ours as it runs

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_steps", "devices", "num_nodes"):
            check_range(name, getattr(self, name), 1)
        if self.optim.schedule != "cosine":
            raise ConfigError(f"optim.schedule '{self.optim.schedule}': litgpt pretrain only has cosine decay")
        check_range("data.num_workers", self.data.num_workers, 0)

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world * self.data.seq_len


def device_type(cfg: LitPretrainConfig) -> str:
    """cpu or cuda: LitGPT takes a device type and a count (`devices`)."""
    from phiforge.train.distributed import resolve_device

    return resolve_device(cfg.device).type


def litgpt_yaml(cfg: LitPretrainConfig, run_dir: Path, initial_dir: Path | None, mcfg=None) -> dict:
    """The `litgpt pretrain --config` YAML for this run (mcfg: the Phi2Config, default from cfg.model)."""
    mcfg = mcfg or model_config_from_spec(cfg.model)
    lit_cfg = config_to_litgpt(mcfg)
    device = device_type(cfg)
    precision = resolve_precision(cfg.precision, device).name
    o = cfg.optim
    T = cfg.data.seq_len
    if T > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len {T} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    y = {
        "model_name": lit_cfg["name"],
        "model_config": lit_cfg,
        "out_dir": str(run_dir / "litgpt"),
        "precision": PRECISION[precision],
        "resume": False,
        "data": {"class_path": "phiforge.litgpt.datamodule.PhiforgeLitData",
                 "init_args": {"data_path": str(Path(cfg.data.dir).resolve()), "split_names": ["train", "val"],
                               "seed": cfg.data.seed, "num_workers": cfg.data.num_workers, "shuffle": cfg.data.shuffle,
                               "pin_memory": device == "cuda"}},
        "train": {"save_interval": cfg.save_interval or None, "log_interval": cfg.log_interval,
                  "global_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * cfg.world,
                  "micro_batch_size": cfg.micro_batch_size, "max_tokens": cfg.max_steps * cfg.tokens_per_step,
                  "max_seq_length": T, "lr_warmup_steps": o.warmup_steps,
                  "max_norm": o.grad_clip if o.grad_clip > 0 else float("inf"),
                  "min_lr": o.lr * o.min_lr_ratio, "tie_embeddings": False},
        "eval": {"interval": cfg.eval_interval, "max_iters": cfg.eval_batches,
                 "initial_validation": cfg.initial_validation,
                 # the last periodic validation already ran at max_steps when it divides evenly
                 "final_validation": cfg.max_steps % cfg.eval_interval != 0},
        "optimizer": {"class_path": "torch.optim.AdamW",
                      "init_args": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": [o.beta1, o.beta2],
                                    "eps": o.eps}},
        "devices": cfg.devices if device == "cuda" else 1,
        "num_nodes": cfg.num_nodes,
        "logger_name": "csv",
        "seed": cfg.seed,
    }
    if device == "cpu" and cfg.world > 1:
        raise ConfigError("devices/num_nodes > 1 needs GPUs")
    if initial_dir is not None:
        y["initial_checkpoint_dir"] = str(initial_dir)
    return y


# ---------------------------------------------------------------------------------------------
# LitGPT's logs -> phiforge events

_ITER_VAL = re.compile(r"\| iter (\d+) step (\d+) \| loss train: [-\d.naif]+, val: ([\d.]+|n/a)")
_VAL = re.compile(r"^iter (\d+): val loss ([\d.]+), val time: ([\d.]+) ms")
_FINAL = re.compile(r"Final evaluation \| val loss: ([\d.]+)")


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def metrics_csv(lit_out: Path) -> Path | None:
    versions = sorted((lit_out / "logs" / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    return versions[-1] if versions else None


def events_from_litgpt(csv_path: Path | None, console: str, cfg: LitPretrainConfig) -> list[dict]:
    """train/eval events, phiforge-style, from LitGPT's CSV log and console output.

    step = optimizer steps; tokens = tokens trained on; elapsed_s = LitGPT's training clock (starts after its
    initial validation; includes compilation); tokens_per_s = tokens / seconds since the previous train event."""
    accum, tps = cfg.grad_accum_steps, cfg.tokens_per_step
    events: list[dict] = []
    val_s = {int(v.group(1)) // accum: float(v.group(3)) / 1000  # seconds each validation took, by step
             for v in (_VAL.match(line.strip()) for line in console.splitlines()) if v}

    def eval_time(step: int) -> float | None:  # LitGPT validates right after logging that step
        t = last_time.get(step)
        return None if t is None else t + val_s.get(step, 0.0)

    rows = list(csv.DictReader(open(csv_path, encoding="utf-8"))) if csv_path and csv_path.exists() else []
    prev_tokens, prev_t = 0, 0.0
    last_time = {}
    for row in rows:
        loss, val = _num(row, "loss"), _num(row, "val_loss")
        if loss is not None:
            it = int(_num(row, "iter"))
            t = _num(row, "time") or 0.0
            tokens = int(_num(row, "total_tokens") or it * tps // accum)
            step = it // accum
            rec = {"event": "train", "step": step, "tokens": tokens, "loss": loss, "lr": _num(row, "learning_rate"),
                   "tokens_per_s": (tokens - prev_tokens) / max(t - prev_t, 1e-9), "elapsed_s": t}
            rec["tokens_per_s_per_device"] = rec["tokens_per_s"] / cfg.world
            events.append(rec)
            prev_tokens, prev_t = tokens, t
            last_time[step] = t
        elif val is not None:
            it = int(_num(row, "step")) + 1  # LitGPT logs validation at step=iter_num - 1
            step = it // accum
            events.append({"event": "eval", "step": step, "tokens": step * tps, "val_loss": val,
                           "val_ppl": perplexity(val), "elapsed_s": eval_time(step)})
    # console: the initial validation (printed with 3 decimals) and a final one the CSV may not have flushed
    m = _ITER_VAL.search(console)
    if cfg.initial_validation and m and m.group(3) != "n/a":
        v = float(m.group(3))
        events.insert(0, {"event": "eval", "step": 0, "tokens": 0, "val_loss": v, "val_ppl": perplexity(v),
                          "elapsed_s": 0.0, "precision_decimals": 3})
    evals = {e["step"] for e in events if e["event"] == "eval"}
    for line in console.splitlines():
        v = _VAL.match(line.strip())
        if v and int(v.group(1)) // accum not in evals:
            step = int(v.group(1)) // accum
            val_loss = float(v.group(2))
            events.append({"event": "eval", "step": step, "tokens": step * tps, "val_loss": val_loss,
                           "val_ppl": perplexity(val_loss), "elapsed_s": eval_time(step)})
            evals.add(step)
    f = _FINAL.search(console)
    if f and cfg.max_steps not in evals:
        v = float(f.group(1))
        events.append({"event": "eval", "step": cfg.max_steps, "tokens": cfg.max_steps * tps, "val_loss": v,
                       "val_ppl": perplexity(v), "elapsed_s": eval_time(cfg.max_steps),
                       "precision_decimals": 3})
    events.sort(key=lambda e: (e["step"], e["event"] != "train"))
    return events


# ---------------------------------------------------------------------------------------------
# Running it


def _litgpt_version() -> str:
    try:
        from importlib.metadata import version

        return version("litgpt")
    except Exception:  # noqa: BLE001 - not installed
        return ""


def run_litgpt(cmd: list[str], log_path: Path, echo: bool, env: dict | None = None) -> tuple[int, str, float, int]:
    """Run `cmd`, teeing its output to log_path (and our stdout when echo); (exit code, output, seconds, peak RSS
    bytes of the child and its descendants)."""
    t0 = time.perf_counter()
    lines = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, errors="replace")
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            proc.terminate()
            raise
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, "".join(lines), time.perf_counter() - t0, usage.ru_maxrss * 1024


def pretrain(cfg: LitPretrainConfig) -> dict:
    """Run `litgpt pretrain` for cfg; returns the summary (also the `end` event of RUN/metrics.jsonl)."""
    try:
        import litgpt  # noqa: F401
    except ImportError as e:
        raise PhiforgeError(f"litgpt is not installed ({e.name}); install the extra: pip install 'phiforge[litgpt]'") \
            from None
    from phiforge.train.metrics import Sinks

    run_dir, data_dir = Path(cfg.out_dir), Path(cfg.data.dir)
    manifest = read_manifest(data_dir)
    notes = check_manifest_fits(manifest, data_dir, cfg.data.seq_len, cfg.micro_batch_size)
    mcfg = model_config_from_spec(cfg.model)
    config_to_litgpt(mcfg)  # refuses moe / xattn before anything runs
    if not cfg.init_from:
        check_vocab_fits(int(manifest["tokenizer"]["vocab_size"]), mcfg.vocab_size,
                         f"the tokenizer of the data in {data_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    initial, mcfg = initial_checkpoint(cfg, run_dir, mcfg)
    lit_yaml = litgpt_yaml(cfg, run_dir, initial, mcfg)
    cmd = [sys.executable, "-m", "litgpt", "pretrain", "--config", str(write_litgpt_config(run_dir, lit_yaml)),
           *cfg.litgpt_args]
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log = Sinks(run_dir, True, tensorboard=False)
    log.write(event="start", trainer="litgpt", litgpt_version=_litgpt_version(), command=" ".join(cmd),
              params=count_params_meta(mcfg)[0], device=device_type(cfg), world_size=cfg.world,
              precision=lit_yaml["precision"], tokens_per_step=cfg.tokens_per_step,
              train_tokens=int(manifest["splits"]["train"]["tokens"]),
              val_tokens=int(manifest["splits"]["val"]["tokens"]), notes=notes, init_from=cfg.init_from)
    for n in notes:
        print(f"note: {n}")
    code, console, wall, rss = run_litgpt(cmd, run_dir / "litgpt.log", cfg.echo, {**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        log.close()
        tail = [line for line in console.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise PhiforgeError(f"litgpt pretrain failed with exit code {code}: {tail[0][:300]} "
                            f"(full output in {run_dir / 'litgpt.log'})")
    end = finish_run(cfg, run_dir, Path(lit_yaml["out_dir"]), console, log)
    end.update(wall_s=wall, peak_rss_gib=rss / 2**30)
    log.write(**end)
    log.close()
    return end


def initial_checkpoint(cfg: LitPretrainConfig, run_dir: Path, mcfg) -> tuple[Path | None, object]:
    """init_from as a LitGPT checkpoint in RUN/initial, and its architecture (which wins over `model:`, as in
    `phiforge train`); (None, mcfg) without init_from."""
    if not cfg.init_from:
        return None, mcfg
    from phiforge.model_files import load_checkpoint

    model = load_checkpoint(cfg.init_from)
    config_to_litgpt(model.cfg)
    initial = run_dir / "initial"
    write_litgpt_checkpoint(model.state_dict(), model.cfg, initial, tokenizer_dir=Path(cfg.init_from))
    return initial, model.cfg


def write_litgpt_config(run_dir: Path, lit_yaml: dict) -> Path:
    """RUN/litgpt-pretrain.yaml, with LitGPT's output directory emptied first (a fresh run: LitGPT would
    otherwise add a new CSV version next to old ones)."""
    import shutil

    lit_out = Path(lit_yaml["out_dir"])
    if lit_out.exists():
        shutil.rmtree(lit_out)
    path = run_dir / "litgpt-pretrain.yaml"
    path.write_text(yaml.safe_dump(lit_yaml, sort_keys=False), encoding="utf-8")
    return path


def finish_run(cfg: LitPretrainConfig, run_dir: Path, lit_out: Path, console: str, log) -> dict:
    """After LitGPT ran: its events into metrics.jsonl, its final weights as the run's phiforge checkpoint (and
    RUN/latest); returns the `end` event's fields."""
    from phiforge.litgpt.convert import LIT_WEIGHTS, convert_from_litgpt

    events = events_from_litgpt(metrics_csv(lit_out), console, cfg)
    for e in events:
        log.write(**e)
    final = lit_out / "final"
    ckpt_name = f"step-{cfg.max_steps:08d}"
    ckpt = run_dir / "checkpoints" / ckpt_name
    data_dir = Path(cfg.data.dir)
    tok_dir = data_dir if (data_dir / "tokenizer.json").is_file() else None
    summary = convert_from_litgpt(final, ckpt, tokenizer_dir=tok_dir)
    (run_dir / "latest").write_text(ckpt_name + "\n", encoding="utf-8")
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    return {"event": "end", "trainer": "litgpt", "steps": cfg.max_steps, "tokens": cfg.max_steps * cfg.tokens_per_step,
            "params": summary["params"], "val_loss_start": evals[0]["val_loss"] if evals else None,
            "val_loss_end": evals[-1]["val_loss"] if evals else None,
            "elapsed_s": trains[-1]["elapsed_s"] if trains else None, "checkpoint": str(ckpt),
            "litgpt_checkpoint": str(final / LIT_WEIGHTS), "world_size": cfg.world}
