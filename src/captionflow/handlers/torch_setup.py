"""Where and in which precision a model runs: resolved on the worker, not on the launcher."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str, *, model_id: str = "") -> torch.device:
    """`auto` means a GPU when the worker has one, else the CPU.

    On a machine with several GPUs, each copy of a model (Beam's `model_copies`, one process
    each) takes the next GPU in turn, so N copies on N GPUs put one copy on each.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        return torch.device("cuda", next_copy_index(model_id) % count if count > 1 else 0)
    check_device(name)
    return torch.device(name)


class DeviceUnavailableError(RuntimeError):
    """The device asked for is not on this machine."""


def check_device(name: str) -> None:
    """Raise `DeviceUnavailableError` unless `name` (`auto`, `cpu`, `cuda[:N]`, `mps`) exists
    here: checked on the launcher for local runners, and again where the model loads."""
    device = torch.device("cpu" if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceUnavailableError(
                f"{name} was asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, {build})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"{name} was asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"{name} was asked for, but MPS is not available here")


def next_copy_index(model_id: str) -> int:
    """0, 1, 2, ... for successive loads of `model_id` on this machine, across processes."""
    key = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"captionflow-copies-{key}")
    with open(path, "a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)
        counter.seek(0)
        index = int(counter.read() or 0)
        counter.seek(0)
        counter.truncate()
        counter.write(str(index + 1))
    return index


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means float16 on a GPU (half the memory, tensor cores) and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def allow_tf32(device: torch.device, dtype: torch.dtype) -> bool:
    """Float32 on a GPU runs its matmuls on tensor cores in TF32 (10-bit mantissa inputs,
    float32 accumulation): several times faster on Ampere and later, with scores within about
    1e-3. Other dtypes and devices are left alone. Process-wide, as torch's switch is."""
    wanted = device.type == "cuda" and dtype == torch.float32
    if wanted:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return wanted
