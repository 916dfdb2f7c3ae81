"""Sharding: planner, sharders and DMP, for 1 or N workers, CPU or CUDA (the process
group: `rocketrec.parallel.dist`).

Parallelism is applied outside the model: `shard_model(model, ...)` takes a
plain `RocketModel`, gives its tables an in-backward (fused) optimizer, plans
the sharding with `EmbeddingShardingPlanner` on a topology of the real world
size and device, and wraps it in `DistributedModelParallel`. The same path
serves one process (a 1-rank gloo group) and N Ray workers.

CPU/gloo facts (measured; docs/results.md): the stock sharder offers row-wise,
table-row-wise and grid only on cuda, so `CPUShardingSharder` adds them on
cpu. Fused CPU optimizers: SGD, Adagrad, rowwise Adagrad (Adam is refused).
Data-parallel tables are trained by the dense optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import ShardingType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DataParallelWrapper,
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from rocketrec.errors import ConfigError
from rocketrec.parallel.dist import DistEnv

if TYPE_CHECKING:
    from rocketrec.spec import FeatureSpec

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "data_parallel")
# Kinds a sequence table (TorchRec EmbeddingCollection, unpooled lookups) may take here:
# the stock EC sharder offers no table_column_wise, and data_parallel failed on CPU/gloo
# in a probe (`split_with_sizes` inside its DDP wrapper).
SEQUENCE_SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def sharding_arg(text: str) -> dict[str, dict[str, str]]:
    """'items=row_wise,users=table_wise' or a JSON object {table: {sharding_type: ...}}."""
    import json

    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--sharding: bad JSON: {e}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
            raise ConfigError("--sharding JSON must map table -> {sharding_type: ...}")
        return obj
    out: dict[str, dict[str, str]] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--sharding: expected table=type, got {part!r}")
        table, st = (x.strip() for x in part.split("=", 1))
        if st not in SHARDING_TYPES:
            raise ConfigError(
                f"--sharding: {table}: sharding type must be one of {', '.join(SHARDING_TYPES)}"
            )
        out[table] = {"sharding_type": st}
    return out


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


def _sparse_optimizer(name: str) -> type[torch.optim.Optimizer]:
    if name == "rowwise_adagrad":
        return RowWiseAdagrad
    if name == "adagrad":
        return torch.optim.Adagrad
    if name == "sgd":
        return torch.optim.SGD
    raise ConfigError(
        f"sparse optimizer must be one of {', '.join(SPARSE_OPTIMIZERS)}, got {name!r}"
    )


# What the planner may choose for a table nobody constrained: every kind but
# data-parallel. A data-parallel table is a dense parameter, trained by the towers'
# optimizer (Adam, lr 1e-3) instead of the tables' fused one (row-wise Adagrad, lr
# 0.15): the planner would pick it for a small table at some worker counts and not at
# others, so the same job would train that table differently on 1 and on 2 workers
# (benchmarks/worker_parity.py). `--sharding table=data_parallel` still asks for it.
PLANNER_KINDS = tuple(t for t in SHARDING_TYPES if t != "data_parallel")

# Kinds whose weights and optimizer state have the same global shape whatever the world
# size (row-wise optimizer state: one value per row; column-wise keeps one per row *per
# column shard*), so a checkpoint's table moves between them exactly (DCP reshards it).
MOVABLE_KINDS = ("table_wise", "row_wise")


def planner_kinds(world_size: int) -> tuple[str, ...]:
    """What the planner may choose for an unconstrained table at `world_size` workers.

    On one worker every kind puts the whole table on the one rank; table-wise does so
    without row-wise's bucketizing and splits of every batch's ids (~1.5 ms of a 30 ms
    step in benchmarks/bench_train.py, where the planner would pick row-wise)."""
    return ("table_wise",) if world_size == 1 else PLANNER_KINDS


def _constraints(
    constraints: Mapping[str, Mapping[str, str]] | None,
    table_names: set[str],
    world_size: int = 2,
    allowed: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, ParameterConstraints]:
    """ParameterConstraints per table: the user's `constraints` ({table: {sharding_type,
    compute_kernel}}) win; else the kinds `allowed` (a resumed checkpoint's); else the
    planner's kinds at `world_size`."""
    allowed = allowed or {}
    pc: dict[str, ParameterConstraints] = {
        t: ParameterConstraints(
            sharding_types=list(allowed.get(t) or planner_kinds(world_size)),
            compute_kernels=["dense"] if allowed.get(t) == ("data_parallel",) else None,
        )
        for t in table_names
    }
    for table, c in (constraints or {}).items():
        if table not in table_names:
            raise ConfigError(f"sharding constraint names unknown table '{table}'")
        unknown = set(c) - {"sharding_type", "compute_kernel"}
        if unknown:
            raise ConfigError(
                f"sharding constraint for '{table}': unknown key(s) {sorted(unknown)}"
            )
        st = c.get("sharding_type")
        if st is not None and st not in SHARDING_TYPES:
            raise ConfigError(
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
    return pc


def _ebcs(model: nn.Module) -> list[nn.Module]:
    """Every table collection of the model: the shared bags, the light tower's private
    bags, the sequence tables (EmbeddingCollection); absent ones left out."""
    names = ("ebc", "light_ebc", "ec")
    return [m for m in (getattr(model, n, None) for n in names) if m is not None]


def table_configs(collection: nn.Module) -> list[Any]:
    """The table configs of an EmbeddingBagCollection or an EmbeddingCollection."""
    if hasattr(collection, "embedding_bag_configs"):
        return list(collection.embedding_bag_configs())  # type: ignore[operator]
    return list(collection.embedding_configs())  # type: ignore[operator]


def prepare_tables(model: nn.Module, sparse_optimizer: str, sparse_lr: float) -> set[str]:
    """Give every table the fused in-backward optimizer; returns the table names."""
    opt_cls = _sparse_optimizer(sparse_optimizer)
    kwargs: dict[str, float] = {"lr": sparse_lr}
    if sparse_optimizer in ("rowwise_adagrad", "adagrad"):
        kwargs["eps"] = 1e-8
    names: set[str] = set()
    for ebc in _ebcs(model):  # shared tables and the light tower's private tables, if any
        apply_optimizer_in_backward(opt_cls, ebc.parameters(), kwargs)  # type: ignore[operator,arg-type]
        names |= {c.name for c in table_configs(ebc)}
    return names


def worker_memory_bytes(device: torch.device) -> int:
    """Memory one worker may use for tables: its GPU's, or this machine's RAM shared by
    the workers on it (LOCAL_WORLD_SIZE, as Ray Train and torchrun set it)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(psutil.virtual_memory().total // local)


def make_planner(
    world_size: int,
    device_type: str,
    memory_per_worker: int,
    constraints: Mapping[str, ParameterConstraints] | None = None,
    batch_size: int = 1024,
) -> EmbeddingShardingPlanner:
    """The planner used by training and by `rocketrec plan`: same settings in both."""
    import logging
    import warnings

    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torchrec.distributed.planner")
    cap = (
        {"hbm_cap": memory_per_worker} if device_type == "cuda" else {"ddr_cap": memory_per_worker}
    )
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )

    topology = Topology(world_size=world_size, compute_device=device_type, **cap)  # type: ignore[arg-type]
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=dict(constraints or {}) or None,
        # 15% of each worker's memory kept for the towers, batches and the process itself
        storage_reservation=FixedPercentageStorageReservation(0.15),
        debug=False,
    )


def sharders_for(device_type: str) -> list[Any]:
    """Sharders of the bag tables and of the sequence tables (EmbeddingCollection)."""
    bags = CPUShardingSharder() if device_type == "cpu" else EmbeddingBagCollectionSharder()
    return [bags, EmbeddingCollectionSharder()]


@dataclass(frozen=True)
class ShardInfo:
    table: str
    sharding_type: str
    compute_kernel: str
    shards: tuple[tuple[int, tuple[int, int], tuple[int, int]], ...]  # (rank, offsets, sizes)
    rows: int
    dim: int


def describe_plan(plan: ShardingPlan, model: nn.Module) -> list[ShardInfo]:
    """Per table: sharding type, kernel and the (rank, offsets, sizes) of every shard."""
    out = []
    dims = {
        c.name: (c.num_embeddings, c.embedding_dim)
        for ebc in _ebcs(model)
        for c in table_configs(ebc)
    }
    for _path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            rows, dim = dims[table]
            if ps.sharding_spec is None:  # data-parallel: a full replica on every rank
                shards = tuple((r, (0, 0), (rows, dim)) for r in (ps.ranks or []))
            else:
                shards = tuple(
                    (
                        int(str(m.placement).split("rank:")[1].split("/")[0]),
                        (m.shard_offsets[0], m.shard_offsets[1]),
                        (m.shard_sizes[0], m.shard_sizes[1]),
                    )
                    for m in ps.sharding_spec.shards  # type: ignore[attr-defined]
                )
            out.append(ShardInfo(table, ps.sharding_type, ps.compute_kernel, shards, rows, dim))
    return out


UVM_CACHE_LOAD_FACTOR = 0.2  # TorchRec's default share of a UVM-cached table kept on the GPU


def memory_per_rank(
    shards: list[ShardInfo], world_size: int, sparse_optimizer: str
) -> list[dict[str, int]]:
    """Bytes per rank (fp32) of table weights + optimizer state on the worker's device
    (`device`: GPU memory on cuda, RAM on cpu) and in host memory for UVM kernels (`host`).

    UVM kernels keep the table in host memory (`fused_uvm`) and, for
    `fused_uvm_caching`, a cache of UVM_CACHE_LOAD_FACTOR of its rows on the GPU.
    """
    per = [{"device": 0, "host": 0, "weights": 0, "optimizer": 0} for _ in range(world_size)]
    for t in shards:
        for rank, _off, (r, c) in t.shards:
            w = r * c * 4
            if t.sharding_type == "data_parallel":
                o = 2 * r * c * 4  # Adam moments (dense optimizer)
            elif sparse_optimizer == "rowwise_adagrad":
                o = r * 4
            elif sparse_optimizer == "adagrad":
                o = r * c * 4
            else:
                o = 0
            per[rank]["weights"] += w
            per[rank]["optimizer"] += o
            if "uvm" in t.compute_kernel:
                per[rank]["host"] += w + o
                if "caching" in t.compute_kernel:
                    per[rank]["device"] += int(UVM_CACHE_LOAD_FACTOR * w)
            else:
                per[rank]["device"] += w + o
    return per


class PlanDoesNotFit(ConfigError):
    pass


def plan_tables(
    model: nn.Module,
    world_size: int,
    device_type: str,
    memory_per_worker: int,
    sparse_optimizer: str = "rowwise_adagrad",
    sparse_lr: float = 0.05,
    constraints: Mapping[str, Mapping[str, str]] | None = None,
    pg: dist.ProcessGroup | None = None,
    allowed: Mapping[str, tuple[str, ...]] | None = None,
) -> ShardingPlan:
    """Plan the tables' sharding (collectively when `pg` is given); a plan that does not
    fit `memory_per_worker` raises PlanDoesNotFit naming the need and the memory.
    `allowed`: kinds per table a resumed checkpoint permits (`constraints` win)."""
    from torchrec.distributed.planner.types import PlannerError

    names = prepare_tables(model, sparse_optimizer, sparse_lr)
    pc = _constraints(constraints, names, world_size, allowed)
    planner = make_planner(world_size, device_type, memory_per_worker, pc)
    sharders = sharders_for(device_type)
    try:
        if pg is not None:
            plan = planner.collective_plan(model, sharders, pg)
        else:
            plan = planner.plan(model, sharders)
    except PlannerError as e:
        need = sum(
            c.num_embeddings * c.embedding_dim * 4
            for ebc in _ebcs(model)
            for c in table_configs(ebc)
        )
        raise PlanDoesNotFit(
            f"the tables ({need / 1e9:.2f} GB of fp32 weights, plus optimizer state) do not fit "
            f"{world_size} worker(s) with {memory_per_worker / 1e9:.2f} GB each on {device_type}: "
            f"use more workers, smaller tables, or check `rocketrec plan` "
            f"({str(e).splitlines()[0]})"
        ) from None
    return plan


class _NoDataParallel(DataParallelWrapper):
    """The dense part unwrapped (one worker)."""

    def wrap(self, dmp: DistributedModelParallel, env: Any, device: torch.device) -> None:
        return None


def shard_model(
    model: nn.Module,
    env: DistEnv,
    sparse_optimizer: str = "rowwise_adagrad",
    sparse_lr: float = 0.05,
    constraints: Mapping[str, Mapping[str, str]] | None = None,
    find_unused_parameters: bool = True,
    allowed: Mapping[str, tuple[str, ...]] | None = None,
) -> DistributedModelParallel:
    """Plan and shard the tables (built on `meta`: DMP materializes only local shards);
    tables get a fused in-backward optimizer.

    constraints: {table: {"sharding_type": ..., "compute_kernel": ...}} from the job config.
    allowed: {table: kinds} a resumed checkpoint permits (see rocketrec/checkpoint/resume.py).
    The planner is capped at the worker's real memory, so a spec that cannot fit fails here,
    with a clear error, before any shard is allocated.
    """
    pg = dist.GroupMember.WORLD
    assert pg is not None
    plan = plan_tables(
        model,
        env.world_size,
        env.device.type,
        worker_memory_bytes(env.device),
        sparse_optimizer,
        sparse_lr,
        constraints,
        pg,
        allowed,
    )
    # The towers' dense parameters are replicated with DDP. Single-tower modes and
    # teacher_student leave some parameters without gradients in some steps: only they
    # need DDP's search for unused parameters (an extra pass over the graph each step).
    # One worker has nothing to average: no DDP (its forward and gradient hooks cost ~1 ms a
    # step on CPU for nothing); the state dict and checkpoints are the same either way.
    wrapper: DataParallelWrapper = (
        DefaultDataParallelWrapper(
            static_graph=False, find_unused_parameters=find_unused_parameters
        )
        if env.world_size > 1
        else _NoDataParallel()
    )
    return DistributedModelParallel(
        module=model,
        device=env.device,
        plan=plan,
        sharders=sharders_for(env.device.type),
        data_parallel_wrapper=wrapper,
    )


def sharding_kinds(dmp: DistributedModelParallel) -> dict[str, str]:
    """{table: sharding type} of a sharded model's plan (saved with every checkpoint)."""
    out: dict[str, str] = {}
    for module_plan in dmp.plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[table] = str(ps.sharding_type)
    return out


def check_sharding(
    constraints: Mapping[str, Any], spec: FeatureSpec, light_private_dim: int = 0
) -> None:
    """Check per-table sharding constraints against the spec before anything starts:
    every table named exists (private light tables too), every value is a mapping with
    known keys and a known sharding type. Errors name the table."""
    from rocketrec.spec import private_table_name

    names = {t.name for t in spec.tables}
    if light_private_dim:
        names |= {private_table_name(f.table) for f in spec.light_sparse}
    for table, c in constraints.items():
        if not isinstance(c, Mapping):
            raise ConfigError(
                f"--sharding: '{table}' must map to {{sharding_type: ...}}, got {c!r}"
            )
        if table not in names:
            raise ConfigError(
                f"--sharding: unknown table '{table}' (spec '{spec.name}' has "
                f"{', '.join(sorted(names))})"
            )
    try:
        _constraints(constraints, names)
    except ValueError as e:
        raise ConfigError(f"--sharding: {e}") from None
    for table in spec.sequence_tables:
        st = (constraints.get(table) or {}).get("sharding_type")
        if st is not None and st not in SEQUENCE_SHARDING_TYPES:
            raise ConfigError(
                f"--sharding: '{table}' holds a sequence (unpooled lookups): its sharding "
                f"type must be one of {', '.join(SEQUENCE_SHARDING_TYPES)}, got {st!r}"
            )
