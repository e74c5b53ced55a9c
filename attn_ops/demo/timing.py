"""Host wall-clock timing of device work: the device is synchronised before and after."""

from __future__ import annotations

import time

import torch


def timed(fn, device: torch.device):
    """``(fn(), seconds)``: the wall time of ``fn`` including the device work it queued.

    ``device`` is where ``fn`` queues work: on an accelerator (CUDA, NPU with torch_npu) the
    queue is drained before and after through ``torch.accelerator``; on the CPU work is
    synchronous and ``torch.accelerator.synchronize`` would raise, so nothing is waited for.
    """
    def drain():
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
    drain()
    start = time.perf_counter()
    out = fn()
    drain()
    return out, time.perf_counter() - start
