"""The process group: the one Ray Train or torchrun started, or a 1-rank gloo group
this process creates (and destroys) for a run without workers."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # we created the process group (and must destroy it)
    store: str | None = None  # the 1-rank group's file store (removed with the group)

    def close(self) -> None:
        """Destroy the process group this process created (and its file store)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if self.store:
            Path(self.store).unlink(missing_ok=True)


def init_distributed() -> DistEnv:
    """Use the existing process group (Ray Train, torchrun) or create a 1-rank gloo group."""
    cuda = torch.cuda.is_available()
    owns, store = False, None
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            fd, path = tempfile.mkstemp(prefix="rocketrec-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group(
                "nccl" if cuda else "gloo", init_method=f"file://{path}", rank=0, world_size=1
            )
            store = path
        owns = True
    rank = dist.get_rank()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, dist.get_world_size(), device, dist.get_backend(), owns, store)
