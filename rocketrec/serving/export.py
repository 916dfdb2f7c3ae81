"""Export from a checkpoint: the light tower, its tables and its preprocessing, scripted.

`export_checkpoint` reads the light tower's tables block by block from a DCP
checkpoint (sharded or not; booster-only tables are never read) straight into
the serving module's fused tables (rocketrec.serving.module), scripts it, writes
it beside the target, loads the file back and refuses to move it into place if
its scores differ from the training model's code path on held-out rows by more
than 1e-5 (fp32) or the int8 bound. The reference uses only the table rows the
held-out rows look up.
"""

import gc
import json
import os
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rocketrec.data.batch import decode_table
from rocketrec.serving.manifest import build_manifest
from rocketrec.serving.module import (
    BlockHook,
    LightServing,
    TableSource,
    check_exportable,
    check_servable,
)
from rocketrec.serving.ops import op_library_entry
from rocketrec.serving.requests import raw_inputs_from_table
from rocketrec.spec import PRIVATE_SUFFIX, FeatureSpec, private_table_name, spec_from_dict

FP32_TOL = 1e-5
INT8_TOL = 2e-2  # max |p_int8 - p_fp32|; row-wise int8 keeps ~1/255 of each row's range


def script_serving(
    spec: FeatureSpec,
    tables: dict[str, TableSource],
    tower: nn.Module,
    int8: bool,
    private_dim: int = 0,
    on_block: BlockHook | None = None,
    negative_sample_rate: float = 1.0,
    portable: bool = False,
) -> torch.jit.ScriptModule:
    """The scripted serving module: on the fused operator (default), or `portable` (plain
    torch ops: any libtorch server of the same version loads it without the op library)."""
    m: nn.Module = LightServing(
        spec, tables, _copy_tower(tower), int8, private_dim, on_block, negative_sample_rate
    )
    if not portable:
        from rocketrec.serving.fused import FusedLightServing

        m = FusedLightServing(m)  # type: ignore[arg-type]
    m.eval()
    # freezing inlines the weights and constants: fewer attribute lookups per call
    return torch.jit.freeze(torch.jit.script(m), preserved_attrs=["score_candidates"])


def _copy_tower(tower: nn.Module) -> nn.Module:
    import copy

    t = copy.deepcopy(tower).cpu().float().eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


# -- from a checkpoint ------------------------------------------------------------


def load_towers(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The RocketModel of a checkpoint with its dense parts loaded and its tables on `meta`.

    Tables stay out of memory: read them block by block with `CheckpointTables`.
    """
    import torch.distributed.checkpoint as dcp

    from rocketrec.model.model import ModelConfig, RocketModel
    from rocketrec.parallel.tables import table_of_key
    from rocketrec.train.checkpoint import read_meta

    meta = read_meta(ckpt)
    spec = spec_from_dict(meta["spec"], source=f"{ckpt}/meta.json")
    mc = meta["model_config"]
    model_cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()})  # type: ignore[arg-type]
    model = RocketModel(spec, model_cfg, table_device=torch.device("meta"))
    dense = {k: v for k, v in model.state_dict().items() if table_of_key(k) is None}
    dcp.load({"model": dense}, checkpoint_id=str(ckpt))
    model.load_state_dict(dense, strict=False)
    model.eval()
    return model, meta


def load_unsharded(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The whole unsharded RocketModel of a checkpoint (small tables: tests, tools)."""
    from rocketrec.model.model import RocketModel
    from rocketrec.parallel.tables import table_of_key
    from rocketrec.train.checkpoint import CheckpointTables

    towers, meta = load_towers(ckpt)
    model = RocketModel(towers.spec, towers.cfg)
    sd, dense = model.state_dict(), towers.state_dict()
    ct = CheckpointTables(ckpt)
    with torch.no_grad():
        for k, v in sd.items():
            if table_of_key(k) is None:
                v.copy_(dense[k])
            else:
                v.copy_(ct.full(f"model.{k}"))
    model.eval()
    return model, meta


class _RowCollector:
    """Keeps the table rows a held-out batch looks up, as the tables stream past."""

    def __init__(self, needed: dict[str, np.ndarray], dims: dict[str, int]) -> None:
        self.needed = needed  # table -> sorted unique rows
        self.rows = {t: torch.zeros(len(r), dims[t]) for t, r in needed.items()}

    def __call__(self, table: str, r0: int, blk: torch.Tensor) -> None:
        need = self.needed.get(table)
        if need is None:
            return
        lo, hi = np.searchsorted(need, [r0, r0 + blk.shape[0]])
        if hi > lo:
            self.rows[table][lo:hi] = blk[torch.from_numpy(need[lo:hi] - r0)]


def _lookups(
    model: Any, batch: Any, gathered: list[str]
) -> tuple[dict[str, np.ndarray], Any, Any, _RowCollector]:
    """Rows of each table that `batch` looks up (through the model's own preprocessing),
    the preprocessed batch, and a collector for the gathered tables."""
    spec: FeatureSpec = model.spec
    with torch.no_grad():
        dense, kjt = model.features(batch.dense, batch.sparse)
    rows = {k: v.values().numpy() for k, v in kjt.to_dict().items()}
    needed: dict[str, np.ndarray] = {t.name: np.zeros(0, np.int64) for t in spec.tables}
    for f in spec.sparse:
        needed[f.table] = np.union1d(needed[f.table], rows[f.name])
    dims = {t.name: t.dim for t in spec.tables}
    want: dict[str, np.ndarray] = {}
    for name in gathered:
        base = name.removesuffix(PRIVATE_SUFFIX)
        want[name] = needed[base]
        dims[name] = dims[base] if name == base else model.cfg.light_private_dim
    return needed, dense, kjt, _RowCollector(want, dims)


def _reference_scores(
    model: Any,
    dense: torch.Tensor,
    kjt: Any,
    booster: bool,
    needed: dict[str, np.ndarray],
    rows: _RowCollector,
    logit_offset: float = 0.0,
) -> torch.Tensor:
    """Scores of the training model's code path on a preprocessed batch (`_lookups`),
    from the looked-up rows only.

    The reference model has compact tables (one row per row the batch looks up)
    and receives the compact rows; everything after preprocessing (torchrec
    pooling, towers) is the training code, and the preprocessing is the training
    model's own (`_lookups`). Tables that were not gathered (booster-only ones in
    a light export) stay zero: the tower scored does not read them.
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from rocketrec.model.model import RocketModel
    from rocketrec.spec import TableSpec

    spec: FeatureSpec = model.spec
    compact_spec = replace(
        spec,
        tables=tuple(
            TableSpec(t.name, max(1, len(needed[t.name])), t.dim, t.pooling) for t in spec.tables
        ),
    )
    ref = RocketModel(compact_spec, model.cfg)
    ref.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("ebc.", "light_ebc."))},
        strict=False,
    )
    with torch.no_grad():
        for ebc in (ref.ebc, ref.light_ebc):
            for name, bag in ebc.embedding_bags.items() if ebc is not None else []:
                bag.weight.zero_()
                if name in rows.rows:
                    bag.weight[: rows.rows[name].shape[0]] = rows.rows[name]
    per = kjt.to_dict()
    table_of = {f.name: f.table for f in spec.sparse}
    values = [
        torch.from_numpy(
            np.searchsorted(needed[table_of[k]], per[k].values().numpy()).astype(np.int64)
        )
        for k in kjt.keys()
    ]
    compact = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=kjt.lengths())
    ref.eval()
    with torch.no_grad():
        o = ref.forward_features(dense, compact)  # both towers (the plan's default); one used
    z = o.booster if booster else o.light
    assert z is not None
    return torch.sigmoid(z + logit_offset)


def _heldout_table(spec: FeatureSpec, data: str | None, rows: int) -> pa.Table:
    from rocketrec.data.reader import list_parquet_files

    if data:
        fs, files = list_parquet_files(data)
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(fs.open_input_file(files[0]))
        t = pf.read_row_group(0, columns=spec.columns())
        return t.slice(0, rows)
    from rocketrec.data.synth import Generator, SynthConfig

    gen = Generator(spec, SynthConfig(rows=rows, seed=12345))
    return gen.table(np.random.default_rng(12345), rows)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    int8: bool = False,
    data: str | None = None,
    rows: int = 2048,
    booster: bool = False,
    portable: bool = False,
) -> dict[str, Any]:
    """Export; returns a report. Writes nothing unless the parity gate passes. The module
    runs on rocketrec's fused operator unless `portable` (rocketrec.serving.fused)."""
    from rocketrec.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(checkpoint)
    if ck is None:
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint found")
    from rocketrec.train.checkpoint import CheckpointTables

    model, meta = load_towers(ck)  # tables stay on disk until streamed below
    if not booster and meta.get("loss_config", {}).get("mode") == "booster_only":
        raise ValueError(
            f"{ck}: a booster_only run trained no light tower; export --booster packages the "
            "booster (for comparisons)"
        )
    spec: FeatureSpec = model.spec
    if booster:
        # comparison only: the booster on every feature, packaged the same way
        spec = replace(spec, light_features=tuple(spec.sparse_names + spec.dense_names))
        tower = _BoosterHead(model.booster)
        if model.bottom is not None:
            raise ValueError("--booster export does not support shared_bottom")
        check_servable(spec)
    else:
        check_exportable(spec, model.cfg, "rocket")  # the checks training starts with
        tower = model.light
    ct = CheckpointTables(ck)
    # only the tables the exported tower reads are gathered, one at a time, block by block
    sources: dict[str, TableSource] = {
        t: partial(ct.row_blocks, f"model.ebc.embedding_bags.{t}.weight")
        for t in dict.fromkeys(f.table for f in spec.light_sparse)
    }
    private_dim = 0
    if not booster and model.light_ebc is not None:
        private_dim = model.cfg.light_private_dim
        for t in dict.fromkeys(f.table for f in spec.light_sparse):
            name = private_table_name(t)
            sources[name] = partial(ct.row_blocks, f"model.light_ebc.embedding_bags.{name}.weight")
    table = _heldout_table(model.spec, data, rows)
    batch = decode_table(table, model.spec, "<held-out>").to_batch()
    needed, dense, kjt, collector = _lookups(model, batch, list(sources))
    rate = float(meta.get("train_config", {}).get("negative_sample_rate", 1.0))
    scripted = script_serving(
        spec,
        sources,
        tower,
        int8,
        private_dim,
        on_block=collector,
        negative_sample_rate=rate,
        portable=portable,
    )
    # reference: the training model's code path on the same rows, corrected the same way
    ref = _reference_scores(model, dense, kjt, booster, needed, collector, np.log(rate))
    manifest = build_manifest(
        spec,
        int8,
        meta.get("metrics", {}),
        {
            "checkpoint": str(ck),
            "step": meta.get("step"),
            "tower": "booster" if booster else "light",
            "light_private_dim": 0 if booster else model.cfg.light_private_dim,
            "negative_sample_rate": rate,
            "calibration": "served probability = sigmoid(logit + log(negative_sample_rate))",
            "op_library": None if portable else op_library_entry(),
        },
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        torch.jit.save(
            scripted, str(tmp), _extra_files={"manifest.json": json.dumps(manifest, indent=1)}
        )
        del scripted  # free the in-memory tables before loading the file back
        gc.collect()
        loaded = torch.jit.load(str(tmp))
        values, lengths, dense = raw_inputs_from_table(table, spec)
        with torch.no_grad():
            got = loaded(values, lengths, dense)
        diff = float((got - ref).abs().max())
        tol = INT8_TOL if int8 else FP32_TOL
        if not diff <= tol:
            raise ValueError(
                f"parity gate failed: exported module differs from the training model by {diff:.3g} "
                f"(> {tol:g}) on {len(ref)} held-out rows; nothing written to {out}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "out": str(out),
        "checkpoint": str(ck),
        "rows_checked": int(len(ref)),
        "max_abs_diff": diff,
        "tolerance": tol,
        "int8": int8,
        "portable": portable,
        "bytes": out.stat().st_size,
        "features": len(spec.light_sparse),
        "dense": len(spec.light_dense),
    }


class _BoosterHead(nn.Module):
    def __init__(self, booster: nn.Module) -> None:
        super().__init__()
        self.booster = booster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.booster(x)
