"""Host wall-clock timing of device work: synchronise the device before and after."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (CUDA or NPU; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``: the wall time of ``fn`` including the device work it queued."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start
