"""Sharding: process group, planner, sharders and DMP, for 1 or N workers, CPU or CUDA.

Parallelism is applied outside the model: `shard_model(model, ...)` takes a
plain `RocketModel`, gives its tables an in-backward (fused) optimizer, plans
the sharding with `EmbeddingShardingPlanner` on a topology of the real world
size and device, and wraps it in `DistributedModelParallel`. The same path
serves one process (a 1-rank gloo group) and N Ray workers.

CPU/gloo facts (ARCHITECTURE.md): the stock sharder offers row-wise,
table-row-wise and grid only on cuda, so `CPUShardingSharder` adds them on
cpu. Fused CPU optimizers: SGD, Adagrad, rowwise Adagrad (Adam is refused).
Data-parallel tables are trained by the dense optimizer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import ShardingType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "data_parallel")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


class CPUShardingSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, also offering row-wise sharding types on cpu (gloo)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for t in (
            ShardingType.ROW_WISE.value,
            ShardingType.TABLE_ROW_WISE.value,
        ):
            if t not in types:
                types.append(t)
        return types


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # we created the process group (and must destroy it)


def init_distributed() -> DistEnv:
    """Use the existing process group (Ray Train, torchrun) or create a 1-rank gloo group."""
    cuda = torch.cuda.is_available()
    owns = False
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
        owns = True
    rank = dist.get_rank()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, dist.get_world_size(), device, dist.get_backend(), owns)


def _sparse_optimizer(name: str) -> type[torch.optim.Optimizer]:
    if name == "rowwise_adagrad":
        return RowWiseAdagrad
    if name == "adagrad":
        return torch.optim.Adagrad
    if name == "sgd":
        return torch.optim.SGD
    raise ValueError(f"sparse optimizer must be one of {', '.join(SPARSE_OPTIMIZERS)}, got {name!r}")


def shard_model(
    model: nn.Module,
    env: DistEnv,
    sparse_optimizer: str = "rowwise_adagrad",
    sparse_lr: float = 0.05,
    constraints: Mapping[str, Mapping[str, str]] | None = None,
) -> DistributedModelParallel:
    """Plan and shard `model.ebc`; tables get a fused in-backward optimizer.

    constraints: {table: {"sharding_type": ..., "compute_kernel": ...}} from the job config.
    """
    opt_cls = _sparse_optimizer(sparse_optimizer)
    kwargs: dict[str, float] = {"lr": sparse_lr}
    if sparse_optimizer in ("rowwise_adagrad", "adagrad"):
        kwargs["eps"] = 1e-8
    ebcs = [m for m in (model.ebc, getattr(model, "light_ebc", None)) if m is not None]
    table_names: set[str] = set()
    for ebc in ebcs:  # shared tables and the light tower's private tables, if any
        apply_optimizer_in_backward(opt_cls, ebc.parameters(), kwargs)  # type: ignore[union-attr,operator,arg-type]
        table_names |= {c.name for c in ebc.embedding_bag_configs()}  # type: ignore[union-attr,operator]
    pc: dict[str, ParameterConstraints] = {}
    for table, c in (constraints or {}).items():
        if table not in table_names:
            raise ValueError(f"sharding constraint names unknown table '{table}'")
        unknown = set(c) - {"sharding_type", "compute_kernel"}
        if unknown:
            raise ValueError(f"sharding constraint for '{table}': unknown key(s) {sorted(unknown)}")
        st = c.get("sharding_type")
        if st is not None and st not in SHARDING_TYPES:
            raise ValueError(
                f"sharding constraint for '{table}': sharding_type must be one of "
                f"{', '.join(SHARDING_TYPES)}, got {st!r}"
            )
        kernel = c.get("compute_kernel")
        if st == "data_parallel" and kernel is None:
            kernel = "dense"
        pc[table] = ParameterConstraints(
            sharding_types=[st] if st else None,
            compute_kernels=[kernel] if kernel else None,
        )
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    sharder = CPUShardingSharder() if env.device.type == "cpu" else EmbeddingBagCollectionSharder()
    planner = EmbeddingShardingPlanner(topology=topology, constraints=pc or None)
    pg = dist.GroupMember.WORLD
    assert pg is not None
    plan = planner.collective_plan(model, [sharder], pg)  # type: ignore[arg-type]
    # The towers' dense parameters are replicated with DDP. Modes use different parts of the
    # graph (booster_only skips the light tower, teacher_student switches phase), so the
    # graph is not static and some parameters go unused in some steps.
    wrapper = DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=True)
    return DistributedModelParallel(
        module=model,
        device=env.device,
        plan=plan,
        sharders=[sharder],  # type: ignore[list-item]
        data_parallel_wrapper=wrapper,
    )
