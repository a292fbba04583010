"""Training config: one dataclass tree serves YAML files, `--set key=value` and Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from phiforge.config import BadValue, check_range, normalized
from phiforge.errors import ConfigError
from phiforge.model import Phi2Config
from phiforge.model.phi2 import preset_values
from phiforge.train.float8 import check_float8


PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-true")
STRATEGIES = ("auto", "none", "ddp", "fsdp", "hsdp")
AC_MODES = ("none", "full", "selective")


@dataclass
class DataConfig:
    dir: str = "data/gutenberg"  # output of `phiforge prepare`
    seq_len: int = 256
    seed: int = 0  # shuffling seed for the training windows
    # none: every token of the split in one stream; index: sample sources by the weights `prepare redpajama`
    # recorded; or {source: weight, ...}. The same mixture is used for validation.
    mixture: str | dict | None = None

    def __post_init__(self):
        check_range("seq_len", self.seq_len, 1)
        if isinstance(self.mixture, str):
            if self.mixture.lower() in ("none", "null", ""):
                self.mixture = None
            elif self.mixture != "index":
                raise ConfigError(f"data.mixture must be none, index or a {{source: weight}} mapping, "
                                  f"got '{self.mixture}'")


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
ADJUST_LR_FNS = ("match_rms_adamw", "original", "spectral_unclamped")


@dataclass
class MuonConfig:
    """`optim.muon:` (only with optim.name=muon): Muon for the weight matrices (docs/training.md, "Optimizers")."""

    lr: float | None = None  # the matrices' peak lr; None: optim.lr (match_rms_adamw makes AdamW's lr carry over)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    # bf16: torch.optim.Muon's own Newton-Schulz (fast on GPUs and bf16 CPUs); fp32: the same iteration in fp32
    # (rounding no longer amplifies tiny gradient differences, e.g. between 1 rank and N); auto: bf16 where the
    # device computes bf16 natively (GPUs; CPUs with AMX or AVX512-BF16), else fp32 (train/precision.py)
    ns_dtype: str = "auto"
    adjust_lr_fn: str = "match_rms_adamw"  # match_rms_adamw | original | spectral_unclamped (torch.optim.Muon's)

    def __post_init__(self):
        if self.lr is not None:
            check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("ns_steps", self.ns_steps, 1, 99)
        if self.ns_dtype not in ("auto", "bf16", "fp32"):
            raise BadValue("ns_dtype", f"must be bf16 or fp32 (or auto: the device's fast one), got '{self.ns_dtype}'")
        if self.adjust_lr_fn not in ADJUST_LR_FNS:
            raise BadValue("adjust_lr_fn", f"must be one of {', '.join(ADJUST_LR_FNS)}, got '{self.adjust_lr_fn}'")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the weight matrices, AdamW for the rest)
    lr: float = 3e-4  # peak lr of the schedule; with muon: the AdamW group's (embeddings, head, biases, norms)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # applied to matrices only, never to biases, norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    muon: MuonConfig | None = None  # Muon's keys; only with name=muon (filled with the defaults when not given)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be cosine, linear, wsd or constant, got '{self.schedule}'")
        if self.name not in OPTIMIZERS:
            raise BadValue("name", f"must be one of {', '.join(OPTIMIZERS)}, got '{self.name}'")
        if self.name == "muon" and self.muon is None:
            self.muon = MuonConfig()
        if self.name != "muon" and self.muon is not None:
            raise BadValue("muon", f"is set but optim.name is {self.name}: set optim.name=muon or drop optim.muon")
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        check_range("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        check_range("eps", self.eps, 0.0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("decay_fraction", self.decay_fraction, 0.0, 1.0)
        check_range("grad_clip", self.grad_clip, 0.0, note=" (0 disables clipping)")


@dataclass
class ParallelConfig:
    """How `parallelize()` lays the model out over the ranks (docs/training.md)."""

    strategy: str = "auto"  # auto (fsdp when world_size > 1, else none) | none | ddp | fsdp | hsdp
    hsdp_replicate: int = 0  # hsdp: replica groups (mesh dim 0); 0 = one per node (world / LOCAL_WORLD_SIZE)
    reshard_after_forward: bool = True  # fsdp/hsdp: free gathered block params after forward (ZeRO-3)
    # grad accumulation: communicate gradients only on the last micro-step. fsdp then keeps unsharded fp32
    # gradients between micro-steps (4 bytes x params per GPU); false: reduce-scatter every micro-step
    # (sharded accumulation; hsdp still defers its cross-node all-reduce to the last micro-step)
    defer_grad_sync: bool = True
    activation_checkpointing: str = "none"  # none | full (every block) | selective
    ac_policy: str = "layer"  # selective: layer (every ac_every-th block) | op (save matmuls, recompute the rest)
    ac_every: int = 2  # selective/layer: checkpoint blocks 0, k, 2k, ...
    compile_backend: str = "inductor"  # torch.compile backend for `compile: true` (per block)
    # seconds any collective (and the start-up rendezvous) waits for the other ranks before failing: it must
    # outlast the longest legitimate wait (loading or saving a checkpoint, the first compiled step); a rank that
    # fails is found in seconds without it (docs/training.md, "When a rank fails")
    collective_timeout_s: float = 600.0

    def __post_init__(self):  # here, not in TrainConfig, so the vision fine-tune's `parallel` is checked too
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        if self.activation_checkpointing not in AC_MODES:
            raise ConfigError(f"parallel.activation_checkpointing must be one of {', '.join(AC_MODES)}, "
                              f"got '{self.activation_checkpointing}'")
        if self.ac_policy not in ("layer", "op"):
            raise ConfigError(f"parallel.ac_policy must be layer or op, got '{self.ac_policy}'")
        check_range("ac_every", self.ac_every, 1)
        check_range("hsdp_replicate", self.hsdp_replicate, 0, note=" (0: one replica group per node)")
        check_range("collective_timeout_s", self.collective_timeout_s, 1, 604800, note=" seconds")


@dataclass
class EvalTaskConfig:
    """One entry of `eval_tasks` (docs/evaluation.md): a local task file or, with format `text`, a text file."""

    name: str = ""
    path: str = ""
    format: str | None = None  # None: the format the name implies (hellaswag, mc, ...); text: .txt / .jsonl text
    limit: int = 200  # questions (text: documents) scored at each validation: bounds the cost
    num_fewshot: int = 0

    def __post_init__(self):
        from phiforge.evaluation.suite import TEXT_FORMAT
        from phiforge.evaluation.tasks import task_format

        for key in ("name", "path"):
            if not getattr(self, key):
                raise BadValue(key, "is missing: each eval_tasks entry needs a name and a path (or is a "
                                    "'NAME[:FORMAT]=PATH' string)")
        if self.format != TEXT_FORMAT:
            task_format(self.name, self.format)
        check_range("limit", self.limit, 1)
        check_range("num_fewshot", self.num_fewshot, 0)

    @classmethod
    def parse(cls, entry: "str | EvalTaskConfig") -> "EvalTaskConfig":
        """An entry as written in the config: 'NAME[:FORMAT]=PATH' or a mapping (already an EvalTaskConfig)."""
        from phiforge.evaluation.tasks import parse_task_spec

        if isinstance(entry, cls):
            return entry
        name, fmt, path = parse_task_spec(entry)
        return cls(name=name, path=path, format=fmt)


@dataclass
class RunConfig:
    """The keys every run config has, and their checks: `phiforge train` (TrainConfig), `phiforge vision finetune`
    (vision.config.FinetuneConfig) and `phiforge litgpt pretrain` (litgpt.pretrain.LitPretrainConfig) extend it."""

    PRECISIONS: ClassVar[tuple[str, ...]] = PRECISIONS  # the precision values a trainer takes
    SAVE_NOTE: ClassVar[str] = " (0: only at the end)"

    model: dict = field(default_factory=lambda: {"preset": "small"})  # preset name + Phi2Config overrides
    init_from: str | None = None  # start from a phiforge checkpoint instead of random weights
    data: object = None  # each trainer's own data section (a dataclass its config declares here)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    eval_interval: int = 100  # steps between validation runs (also at step 0 and the end)
    eval_batches: int = 20
    save_interval: int = 0  # steps between checkpoints (also at the end); 0: only at the end
    log_interval: int = 10
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16-mixed on GPU, fp32 on CPU) | fp32 | bf16-mixed | bf16-true
    seed: int = 1337

    def __post_init__(self):
        if self.precision not in self.PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(self.PRECISIONS)}, got '{self.precision}'")
        for name in ("micro_batch_size", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval"):
            check_range(name, getattr(self, name), 1)
        check_range("save_interval", self.save_interval, 0, note=self.SAVE_NOTE)
        self.model = checked_model_spec(self.model)

    def model_config(self) -> Phi2Config:
        return model_config_from_spec(self.model)


@dataclass
class EngineConfig(RunConfig):
    """The keys of a run on phiforge's own training engine (train/engine.py): text and vision."""

    keep_checkpoints: int = 2
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resume: str = "none"  # none | auto (newest complete checkpoint of out_dir, if any) | PATH to a step-N dir
    compile: bool = False  # torch.compile each block (after activation checkpointing, before FSDP)
    # none | tensorwise | rowwise: the block linears in float8 with torchao (train/float8.py; docs/performance.md,
    # "Float8"); needs precision bf16-mixed or bf16-true and `pip install 'phiforge[float8]'`
    float8: str = "none"
    max_bad_steps: int = 5  # halt after this many consecutive non-finite losses / grad norms (each one is skipped)
    tensorboard: bool = True  # also write RUN/tensorboard/ when the tensorboard package is installed
    wandb_project: str | None = None  # also log to this W&B project when wandb is installed
    progress_bar: bool = True  # rank 0 only
    # true: deterministic algorithms (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, no cuDNN attention,
    # the padded MoE path), so a GPU run, and its resume, is bit-exact as on a CPU; slower (train/determinism.py)
    deterministic: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_range("max_bad_steps", self.max_bad_steps, 1)
        check_range("keep_checkpoints", self.keep_checkpoints, 0, note=" (0 keeps all)")
        check_range("threads", self.threads, 0, note=" (0 keeps torch's default)")
        check_range("threads", self.threads, hi=4096, note=" (CPU threads per process)")
        if not self.resume:
            raise ConfigError("resume must be none, auto or a checkpoint path")
        check_float8(self.float8, self.precision)


@dataclass
class TrainConfig(EngineConfig):
    data: DataConfig = field(default_factory=DataConfig)
    max_steps: int = 1000
    save_interval: int = 500
    # > 0: the loss through the chunked linear + cross-entropy, this many rows of logits at a time (saves the
    # [tokens, vocab] fp32 logits: GPU memory; on CPU the plain path is a little faster). 0: the plain head
    loss_chunk_rows: int = 0
    # periodic saves with dcp.async_save: staged into CPU memory, written and completed in the background while
    # training goes on (the final save is synchronous); costs a CPU copy of this rank's model + optimizer state
    async_checkpoint: bool = True
    mfu_peak_tflops: float = 0.0  # bf16 dense peak per device for MFU; 0 = look the GPU up in the peak table
    # local tasks and text files scored at every validation (docs/evaluation.md): 'NAME[:FORMAT]=PATH' strings or
    # {name, path, format, limit, num_fewshot}; metrics task/NAME/acc, text/NAME/bpb, ... in metrics.jsonl
    eval_tasks: list[str | EvalTaskConfig] = field(default_factory=list)
    eval_tasks_interval: int = 0  # >0: eval_tasks only at validations whose step is a multiple of it (and the last)
    # true (or --allow-tokenizer-mismatch): train data made by another tokenizer than the model's (init_from, the
    # checkpoint resumed) or a dataset without tokenizer.json, with a warning instead of an error
    allow_tokenizer_mismatch: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_range("max_steps", self.max_steps, 1)
        check_range("mfu_peak_tflops", self.mfu_peak_tflops, 0.0, note=" (0 looks the GPU up)")
        check_range("loss_chunk_rows", self.loss_chunk_rows, 0, note=" (0: the plain head)")
        check_range("eval_tasks_interval", self.eval_tasks_interval, 0, note=" (0: at every validation)")
        self.eval_tasks = [EvalTaskConfig.parse(e) for e in self.eval_tasks]
        names = [e.name for e in self.eval_tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval_tasks names must differ (their metrics are named after them): {names}")


def model_config_from_spec(spec: dict, prefix: str = "model.") -> Phi2Config:
    """A `model:` config section (optional `preset` + Phi2Config overrides) as a Phi2Config; errors name
    prefix + key."""
    spec = dict(spec)
    preset = spec.pop("preset", None)
    base = preset_values(preset) if preset is not None else {}
    return Phi2Config.from_dict({**base, **spec}, prefix=prefix)


def checked_model_spec(spec: dict, prefix: str = "model.") -> dict:
    """A `model:` section validated as a whole (keys, types, ranges) and returned in its own shape (preset +
    overrides, values coerced), so a config that loads is one that builds and --print-config prints it back."""
    if not isinstance(spec, dict):
        raise BadValue(prefix.rstrip("."), f"must be a mapping, got {spec!r}")
    model_config_from_spec(spec, prefix)
    rest = {k: v for k, v in spec.items() if k != "preset"}
    return {**({"preset": spec["preset"]} if "preset" in spec else {}), **normalized(Phi2Config, rest, prefix)}
