"""Training config: one dataclass tree serves YAML files, `--set key=value` and Python."""

from __future__ import annotations

from dataclasses import dataclass, field

from phiforge.errors import ConfigError
from phiforge.model import Phi2Config


@dataclass
class DataConfig:
    dir: str = "data/gutenberg"  # output of `phiforge prepare`
    seq_len: int = 256
    seed: int = 0  # shuffling seed for the training windows


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # applied to matrices only, never to biases, norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "small"})  # preset name + Phi2Config overrides
    init_from: str | None = None  # start from a phiforge checkpoint instead of random weights
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    eval_interval: int = 100  # steps between validation runs (also at step 0 and the end)
    eval_batches: int = 20
    save_interval: int = 500  # steps between checkpoints (also at the end); 0: only at the end
    keep_checkpoints: int = 2
    log_interval: int = 10
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16-mixed on GPU, fp32 on CPU) | fp32 | bf16-mixed
    seed: int = 1337
    compile: bool = False
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default

    def __post_init__(self):
        if self.optim.schedule not in ("cosine", "linear", "wsd", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear, wsd or constant, got '{self.optim.schedule}'")
        if self.precision not in ("auto", "fp32", "bf16-mixed"):
            raise ConfigError(f"precision must be auto, fp32 or bf16-mixed, got '{self.precision}'")
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")

    def model_config(self) -> Phi2Config:
        return model_config_from_spec(self.model)


def model_config_from_spec(spec: dict) -> Phi2Config:
    """A `model:` config section (optional `preset` + Phi2Config overrides) as a Phi2Config."""
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is None:
        return Phi2Config.from_dict(spec)
    return Phi2Config.from_preset(preset, **spec)
