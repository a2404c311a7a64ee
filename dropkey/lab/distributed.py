"""Distributed training helpers: the process group under ``torchrun``, all-reduce of metrics, a free port.

Launched with ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) or inside an initialised
process group, a run is distributed (see :mod:`dropkey.lab.train`); :func:`dropkey.lab.train.launch_local`
starts W processes on this machine without torchrun.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def dist_info() -> tuple[bool, int, int, int]:
    """(distributed, rank, world size, local rank); initialises the group under torchrun."""
    if not dist.is_available():
        return False, 0, 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("initialised process group (%s), rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    if dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return False, 0, 1, 0


def all_reduce(values: Sequence[float], device: torch.device, distributed: bool) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a local process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
