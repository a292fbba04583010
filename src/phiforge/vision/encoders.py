"""Vision encoders: images (or precomputed features) in, a sequence of feature tokens [B, N, D] out.

Every encoder takes what `load_visual` returns, batched: pixels as uint8 [B, 3, S, S] (normalised here with
the encoder's mean/std) or, for `features`, float [B, N, D]. timm, transformers and PIL are imported only
when an encoder or image needs them, so the text-only core never imports them. Nothing is downloaded:
pretrained weights come from local files.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from phiforge.errors import ConfigError, DataError
from phiforge.vision.config import EncoderConfig

FEATURE_SUFFIXES = (".npy", ".safetensors")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def require(module: str):
    """Import an optional dependency, or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this needs the '{module}' package: pip install 'phiforge[vision]'") from None


# ---------------------------------------------------------------------------------------------
# Loading images and features


def load_visual(path: Path, cfg: EncoderConfig) -> torch.Tensor:
    """One image as uint8 [3, S, S] (resized to cfg.image_size), or precomputed features as float [N, D].

    Raises FileNotFoundError for a missing file and DataError for one that cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(path)
    if cfg.type == "features":
        return _load_features(path, cfg.dim)
    Image = require("PIL.Image")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {e}") from None


def _load_features(path: Path, dim: int) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            feats = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            feats = tensors["features"] if "features" in tensors else next(iter(tensors.values()))
        else:
            raise DataError(f"precomputed features must be {' or '.join(FEATURE_SUFFIXES)}: {path}")
    except DataError:
        raise
    except Exception as e:  # numpy and safetensors raise assorted errors on bad files
        raise DataError(f"cannot read features {path}: {e}") from None
    if feats.ndim != 2 or feats.size(1) != dim:
        raise DataError(f"features in {path} have shape {tuple(feats.shape)}; expected [tokens, {dim}]")
    return feats.float()


# ---------------------------------------------------------------------------------------------
# Encoders


class ConvBackbone(nn.Module):
    """Three stride-2 3x3 convolutions: an SxS image becomes (S/8)^2 tokens of width dim, with learned positions.
    Small enough to train from scratch on a CPU."""

    def __init__(self, image_size: int, dim: int):
        super().__init__()
        if image_size % 8 or dim % 4:
            raise ConfigError(f"conv encoder needs image_size divisible by 8 and dim by 4 (got {image_size}, {dim})")
        self.net = nn.Sequential(
            nn.Conv2d(3, dim // 4, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(dim // 4, dim // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
        )
        self.pos = nn.Parameter(torch.randn(1, (image_size // 8) ** 2, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x).flatten(2).transpose(1, 2) + self.pos)


class TimmBackbone(nn.Module):
    def __init__(self, cfg: EncoderConfig, load_weights: bool):
        super().__init__()
        timm = require("timm")
        kwargs = dict(num_classes=0, **cfg.kwargs)
        if "img_size" not in kwargs and cfg.name.startswith(("vit", "deit", "eva")):
            kwargs["img_size"] = cfg.image_size
        if load_weights and cfg.path:
            if not Path(cfg.path).is_file():
                raise ConfigError(f"timm weights file not found: {cfg.path}")
            # timm's own loader adapts the weights (drops the classifier, resamples position embeddings)
            self.model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=dict(file=cfg.path),
                                           **kwargs)
        else:
            self.model = timm.create_model(cfg.name, pretrained=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        return y.flatten(2).transpose(1, 2) if y.ndim == 4 else y  # CNNs give [B, C, H, W]


class HFBackbone(nn.Module):
    """A CLIP or SigLIP vision tower from a local transformers directory (a full CLIP/SigLIP model works too)."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool):
        super().__init__()
        transformers = require("transformers")
        if cfg.hf_config is None:
            try:
                conf = transformers.AutoConfig.from_pretrained(cfg.path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read a transformers config from {cfg.path}: {e}") from None
            conf = getattr(conf, "vision_config", conf)
            cfg.hf_config = conf.to_dict()
        model_type = cfg.hf_config.get("model_type")
        classes = {"clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
                   "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel")}
        if model_type not in classes:
            raise ConfigError(f"hf encoder supports CLIP and SigLIP vision towers, not '{model_type}'")
        conf_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
        conf = conf_cls.from_dict(cfg.hf_config)
        if load_weights and cfg.path:
            self.model = model_cls.from_pretrained(cfg.path, config=conf, local_files_only=True)
        else:
            self.model = model_cls(conf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state


class ImageEncoder(nn.Module):
    """uint8 pixels [B, 3, S, S] -> normalised -> backbone -> tokens [B, N, out_dim]."""

    def __init__(self, backbone: nn.Module, out_dim: int, mean: list[float], std: list[float]):
        super().__init__()
        self.backbone, self.out_dim = backbone, out_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.mean.dtype) / 255.0  # normalised in fp32, then in the dtype the backbone computes in
        return self.backbone(((x - self.mean) / self.std).to(next(self.backbone.parameters()).dtype))


class FeatureEncoder(nn.Module):
    """Precomputed features pass straight through to the projector."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def build_encoder(cfg: EncoderConfig, load_weights: bool = True) -> nn.Module:
    """Build the encoder `cfg` describes. Values it resolves (image size, mean/std, the HF config) are written
    back into cfg, so a checkpoint's copy rebuilds the same encoder without the source files.
    load_weights=False builds the architecture only (its weights then come from a checkpoint)."""
    if cfg.type == "features":
        return FeatureEncoder(cfg.dim)
    if cfg.type == "conv":
        backbone, out_dim, mean, std = ConvBackbone(cfg.image_size, cfg.dim), cfg.dim, [0.5] * 3, [0.5] * 3
    elif cfg.type == "timm":
        backbone = TimmBackbone(cfg, load_weights)
        out_dim = backbone.model.num_features
        pcfg = getattr(backbone.model, "pretrained_cfg", {}) or {}
        mean, std = list(pcfg.get("mean", [0.5] * 3)), list(pcfg.get("std", [0.5] * 3))
    else:
        backbone = HFBackbone(cfg, load_weights)
        cfg.image_size = int(cfg.hf_config["image_size"])
        out_dim, mean, std = int(cfg.hf_config["hidden_size"]), CLIP_MEAN, CLIP_STD
        if cfg.hf_config["model_type"] == "siglip_vision_model":
            mean, std = [0.5] * 3, [0.5] * 3
    cfg.mean = [float(m) for m in (cfg.mean or mean)]
    cfg.std = [float(s) for s in (cfg.std or std)]
    return ImageEncoder(backbone, out_dim, cfg.mean, cfg.std)
