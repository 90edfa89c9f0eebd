"""Where the model runs: the `--device` choice of every command, and whether bf16 autocast pays there.

A device that does not exist or is not present is a `DeviceError` with a one-line message, so a
command can print it and exit with status 2.
"""

from __future__ import annotations

import os

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


class DeviceError(ValueError):
    """A `--device` that is misspelt or not present on this machine; the message is one line."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """"auto" (CUDA, under torchrun this process's GPU; else Apple's MPS; else the CPU), or a device
    string such as "cpu", "cuda", "cuda:1", "mps" that must be present here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise DeviceError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {name} asked for, but no CUDA GPU is available")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name} asked for, but this machine has {count} CUDA GPU(s)")
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"--device {name} asked for, but Apple's MPS is not available")
    return device


def cpu_has_bf16_units() -> bool:
    """Linux CPU flags name bf16 matrix instructions; elsewhere assume none (fp32 stays the safe pick)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, amp: str) -> bool:
    """`amp` "bf16" or "off" as given; "auto" picks bf16 on CUDA and on CPUs with bf16 matrix units
    (AVX512-BF16 / AMX), where it runs faster; elsewhere bf16 would be emulated and slower."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_bf16_units()


def autocast(device: torch.device, amp: str):
    """bf16 autocast on `device` where `uses_bf16` says so, else a context that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, amp))
