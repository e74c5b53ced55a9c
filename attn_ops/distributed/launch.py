"""Joining the process group ``torchrun`` describes, on CPU (gloo) or CUDA (NCCL)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device_type: str) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's
    device: gloo and the CPU for ``"cpu"``, NCCL and GPU ``LOCAL_RANK`` for ``"cuda"`` (binding
    the group to that GPU up front, so NCCL need not guess it)."""
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    if device_type != "cpu":
        raise ValueError(f"device_type: expected 'cpu' or 'cuda', got {device_type!r}")
    dist.init_process_group("gloo")
    return torch.device("cpu")
