"""Vision configs: the encoder and projector (saved in a checkpoint's config.json under "vision") and the
two-stage fine-tuning run (`phiforge vision finetune --config FILE`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from phiforge.config import check_range
from phiforge.errors import ConfigError
from phiforge.train.config import EngineConfig, OptimConfig

ENCODERS = ("conv", "timm", "hf", "features")
PROJECTORS = ("mlp", "resampler")
PARTS = ("encoder", "projector", "xattn", "lm")  # what a stage can train; everything else is frozen


@dataclass
class EncoderConfig:
    type: str = "conv"  # conv (built in) | timm | hf (CLIP/SigLIP vision tower) | features (precomputed)
    name: str = "vit_tiny_patch16_224"  # timm model name
    path: str | None = None  # timm: local weights file; hf: local model directory. Never downloaded.
    image_size: int = 64  # images are resized to image_size x image_size (hf: taken from the model)
    dim: int = 128  # conv: output width; features: width of the precomputed features
    mean: list[float] | None = None  # pixel normalisation; None: the encoder's own (0.5 for conv)
    std: list[float] | None = None
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments, e.g. {patch_size: 8, depth: 4}
    hf_config: dict | None = None  # filled in from `path` when first built, so a checkpoint needs no source dir

    def __post_init__(self):
        if self.type not in ENCODERS:
            raise ConfigError(f"vision.encoder.type must be one of {', '.join(ENCODERS)}, got '{self.type}'")
        if self.type == "hf" and not self.path and self.hf_config is None:
            raise ConfigError("vision.encoder.type hf needs vision.encoder.path (a local CLIP/SigLIP directory)")
        check_range("image_size", self.image_size, 1)
        check_range("dim", self.dim, 1)


@dataclass
class ProjectorConfig:
    type: str = "mlp"  # mlp: one context token per encoder token | resampler: num_tokens learned latents
    num_tokens: int = 16  # resampler latents (Flamingo uses 64)
    depth: int = 2  # resampler layers
    heads: int = 4  # resampler attention heads

    def __post_init__(self):
        if self.type not in PROJECTORS:
            raise ConfigError(f"vision.projector.type must be one of {', '.join(PROJECTORS)}, got '{self.type}'")
        for name in ("num_tokens", "depth", "heads"):
            check_range(name, getattr(self, name), 1)


@dataclass
class VisionConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class VisionDataConfig:
    train: str = "data/vision-synth/train.json"  # LLaVA-format JSON list (or JSONL)
    val: str | None = None  # same format; its loss is logged every eval_interval steps
    image_dir: str | None = None  # where `image` paths are resolved; None: the JSON file's directory
    max_len: int = 128  # tokens per conversation; longer ones are truncated

    def __post_init__(self):
        check_range("max_len", self.max_len, 2)


STAGE_DEFAULTS = {"stage1": ["projector", "xattn"], "stage2": ["projector", "xattn", "lm"]}


@dataclass
class StageConfig:
    steps: int = 100  # 0 skips the stage
    lr: float = 1e-3
    warmup_steps: int = 20
    train: list[str] | None = None  # parts of PARTS to train; None: STAGE_DEFAULTS

    def __post_init__(self):
        check_range("steps", self.steps, 0, note=" (0 skips the stage)")
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, 0)
        bad = sorted(set(self.train or []) - set(PARTS))
        if bad:
            raise ConfigError(f"unknown part(s) to train: {', '.join(bad)} (choose from {', '.join(PARTS)})")


@dataclass
class FinetuneConfig(EngineConfig):
    """The fine-tune's run config; the keys it shares with `phiforge train` are train.config.EngineConfig's."""

    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", "fp32", "bf16-mixed")
    SAVE_NOTE: ClassVar[str] = " (0: only at the end of each stage)"

    model: dict = field(default_factory=lambda: {"preset": "small"})  # + xattn: {...}; see build_vision_model
    init_from: str | None = None  # a phiforge checkpoint: text-only (gets xattn from model.xattn) or vision
    data: VisionDataConfig = field(default_factory=VisionDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # lr and warmup_steps come from each stage
    micro_batch_size: int = 16
    eval_batches: int = 4
    out_dir: str = "runs/vision"
    # the training engine's pieces (docs/vision.md, "Checkpoints, resume, activation checkpointing, ranks")
    save_interval: int = 0  # steps between checkpoints; 0: only at the end of each stage
    keep_checkpoints: int = 0  # newest checkpoints to keep; 0 keeps all (the stage ends are often wanted)
    vision: VisionConfig = field(default_factory=VisionConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)

    def __post_init__(self):
        for name, parts in STAGE_DEFAULTS.items():
            stage = getattr(self, name)
            if stage.train is None:
                stage.train = list(parts)
        # build_vision_model adds xattn: {} when it is not given; XAttnConfig's defaults always pass
        super().__post_init__()
