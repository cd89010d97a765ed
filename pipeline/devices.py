"""Where a stage's tensors live: its ``device`` param, one of "auto", "cpu", "cuda"."""

from __future__ import annotations

from typing import get_args

import torch

from .config import Device

DEVICES: tuple[str, ...] = get_args(Device)


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` is the GPU when torch sees one, else the CPU. ``key`` names the param in errors."""
    if name not in DEVICES:
        raise ValueError(f"{key} is {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key} is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)
