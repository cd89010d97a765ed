"""Where a stage's tensors live: its ``device`` param, one of "auto", "cpu", "cuda"."""

from __future__ import annotations

import ctypes
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


def keep_freed_cpu_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    PyTorch's CPU tensors come from plain malloc. glibc serves large blocks with fresh ``mmap`` calls
    and trims the heap on free, so a loop that allocates and frees the same multi-MB activations on
    every step page-faults them in again each time: the EPG update at the quick profile's shapes took
    ~190 000 minor page faults per benchmark run and ran ~15 % slower. Process-wide and idempotent;
    returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; keep up to 1 GiB of freed heap.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
