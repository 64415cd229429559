"""Where a model runs and in which precision: the site's GPU when it has one, else the CPU.

bf16 autocast on a GPU halves activation memory and roughly doubles matmul throughput while
weights, optimizer state and Opacus' per-sample gradients stay float32; the CPU trains in
float32 by default (bf16 there is for tests of that path, not for speed).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide."""


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {requested!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' asked for, but this machine has no usable GPU")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {requested!r} is not supported (use auto, cpu or cuda)")
    return device


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16 if precision == "auto" else _no_bf16()
        return torch.bfloat16
    if precision not in ("auto", "fp32"):
        raise DeviceError(f"unknown precision {precision!r} (use auto, fp32 or bf16)")
    return None


def _no_bf16() -> torch.dtype:
    raise DeviceError("precision bf16 asked for, but this GPU does not support bfloat16")


def autocast(
    device: torch.device, precision: Precision
) -> contextlib.AbstractContextManager[object]:
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def release_host_memory() -> None:
    """Hands freed host memory back to the OS. glibc keeps large freed blocks in its heap, so a
    process that built a pretrained model once (the simulation's coordinator building the
    foundation) would otherwise hold gigabytes it no longer uses for the whole run."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
