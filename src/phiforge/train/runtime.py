"""Pieces every training loop shares (text and vision): device choice, autocast and the metrics log."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from phiforge.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return dev


def autocast_context(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class MetricsLog:
    """Append-only JSON lines; one object per event."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
