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
import shutil
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rocketrec.checkpoint.files import latest_checkpoint
from rocketrec.checkpoint.meta import saved_config
from rocketrec.checkpoint.tables import CheckpointTables, load_towers
from rocketrec.data.batch import decode_table
from rocketrec.data.synth import heldout_table
from rocketrec.errors import CheckpointNotFound, ExportError
from rocketrec.model.init import table_weight_key
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
from rocketrec.spec import PRIVATE_SUFFIX, FeatureSpec, private_table_name

FORMATS = ("torchscript", "aoti")
FP32_TOL = 1e-5
INT8_TOL = 2e-2  # max |p_int8 - p_fp32|; row-wise int8 keeps ~1/255 of each row's range


def serving_module(
    spec: FeatureSpec,
    tables: dict[str, TableSource],
    tower: nn.Module,
    int8: bool,
    private_dim: int = 0,
    on_block: BlockHook | None = None,
    negative_sample_rate: float = 1.0,
    portable: bool = False,
    attention: nn.ModuleDict | None = None,
) -> nn.Module:
    """The served module (eval mode): on the fused operator (default), or `portable`
    (plain torch ops: any libtorch server of the same version loads it without the op
    library). `attention` (the booster's units, per sequence): the booster with its target
    attention (rocketrec.serving.booster), always on plain torch ops."""
    m: nn.Module = LightServing(
        spec, tables, _copy_tower(tower), int8, private_dim, on_block, negative_sample_rate
    )
    if attention is not None:
        from rocketrec.serving.booster import AttentionBoosterServing

        m = AttentionBoosterServing(m, spec, _copy_tower(attention))  # type: ignore[arg-type]
    elif not portable:
        from rocketrec.serving.fused import FusedLightServing

        m = FusedLightServing(m)  # type: ignore[arg-type]
    return m.eval()


def script(m: nn.Module) -> torch.jit.ScriptModule:
    """The TorchScript of a serving module, frozen."""
    # freezing inlines the weights and constants: fewer attribute lookups per call. Not
    # the tables: a frozen constant lives as long as the process (TorchScript's
    # compilation unit keeps the frozen graph), so every export would leak its tables
    # and the parity gate's load-back would hold them twice; as attributes they are the
    # module's, freed with it.
    keep = [n for n, _ in m.named_buffers() if n.startswith("table_")]
    if isinstance(getattr(m, "tables", None), list):
        keep.append("tables")
    return torch.jit.freeze(torch.jit.script(m), preserved_attrs=["score_candidates", *keep])


def script_serving(*args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
    """script(serving_module(...)): the TorchScript export's module."""
    return script(serving_module(*args, **kwargs))


def _copy_tower(tower: nn.Module) -> nn.Module:
    import copy

    t = copy.deepcopy(tower).cpu().float().eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


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
        {
            k: v
            for k, v in model.state_dict().items()
            if not k.startswith(("ebc.", "light_ebc.", "ec."))
        },
        strict=False,
    )
    with torch.no_grad():
        for coll, attr in ((ref.ebc, "embedding_bags"), (ref.light_ebc, "embedding_bags")) + (
            (ref.ec, "embeddings"),
        ):
            for name, bag in getattr(coll, attr).items() if coll is not None else []:
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


def _pass_gate(tmp: Path, out: Path, diff: float, tol: float, rows: int, what: str) -> None:
    """Move the checked file `tmp` onto `out` if its max |diff| is within `tol`, else refuse
    (the caller removes `tmp`)."""
    if not diff <= tol:
        raise ExportError(
            f"parity gate failed: {what} differs from the training model by {diff:.3g} "
            f"(> {tol:g}) on {rows} held-out rows; nothing written to {out}"
        )
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


def _write_gated(
    box: list[Any],
    manifest: dict[str, Any],
    out: Path,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref: torch.Tensor,
    int8: bool,
) -> tuple[float, float]:
    """Save the scripted module in `box` to a temp file, load it back, score `inputs`;
    rename onto `out` only if the scores match `ref` (the parity gate). Returns
    (max |diff|, tolerance). `box` is emptied once saved, so that the in-memory tables
    are freed before the file is loaded back."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        torch.jit.save(
            box[0], str(tmp), _extra_files={"manifest.json": json.dumps(manifest, indent=1)}
        )
        box.clear()  # free the in-memory tables before loading the file back
        gc.collect()
        loaded = torch.jit.load(str(tmp))
        with torch.no_grad():
            got = loaded(*inputs)
        diff = float((got - ref).abs().max())
        tol = INT8_TOL if int8 else FP32_TOL
        _pass_gate(tmp, out, diff, tol, len(ref), "exported module")
    finally:
        if tmp.exists():
            tmp.unlink()
    return diff, tol


def _write_format(
    fmt: str,
    box: list[Any],
    manifest: dict[str, Any],
    out: Path,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref: torch.Tensor,
    table: pa.Table,
    int8: bool,
) -> dict[str, Any]:
    """Write the serving module in `box` as `fmt` behind the parity gate: {"diff", "tol",
    "format", and for aoti "compile_seconds"}."""
    if fmt == "aoti":
        cand = _candidate_inputs(table, manifest)
        diff, tol, seconds = _write_aoti_gated(box, manifest, out, inputs, ref, cand, int8)
        return {"diff": diff, "tol": tol, "format": fmt, "compile_seconds": seconds}
    box[0] = script(box[0])
    diff, tol = _write_gated(box, manifest, out, inputs, ref, int8)
    return {"diff": diff, "tol": tol, "format": fmt}


def _candidate_inputs(table: pa.Table, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """A one-context, many-candidates request from held-out rows (the context: the inputs
    whose name mentions 'user', as `rocketrec requests` does) and its merged rows."""
    from rocketrec.serving.requests import (
        Inputs,
        candidate_requests_from_table,
        default_context,
        parse_line,
        tensors,
    )

    n = max(2, min(table.num_rows, 33))
    grouped, rows = candidate_requests_from_table(
        table.slice(0, n), manifest, n, default_context(manifest)
    )
    inp = Inputs(manifest)
    req = parse_line(grouped[0], inp)
    merged = [parse_line(line, inp) for line in rows]
    return tensors([req.context, *req.candidates], inp), tensors(merged, inp)  # type: ignore[union-attr, list-item, arg-type]


def _write_aoti_gated(
    box: list[Any],
    manifest: dict[str, Any],
    out: Path,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref: torch.Tensor,
    cand: tuple[Any, Any],
    int8: bool,
) -> tuple[float, float, float]:
    """Compile the serving module in `box` into an AOTInductor package beside `out`, load
    it back and rename it onto `out` only if forward matches `ref` and score_candidates
    matches forward on the same merged rows (each within the tolerance). Returns (max
    |diff|, tolerance, compile seconds)."""
    from rocketrec.serving.aoti import AotiModel, temp_beside, write_package

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out)
    tol = INT8_TOL if int8 else FP32_TOL
    try:
        has_candidates = hasattr(box[0], "score_candidates")
        try:
            seconds = write_package(
                box[0], manifest, tmp, inputs, cand[0] if has_candidates else None
            )
        except Exception as e:  # torch.export / inductor: say which module could not compile
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(
                f"--format aoti: this model could not be compiled by torch.export / "
                f"AOTInductor ({type(e).__name__}: {first}); export it as TorchScript "
                f"(--format torchscript); nothing written to {out}"
            ) from e
        box.clear()
        gc.collect()
        loaded = AotiModel(tmp)
        with torch.no_grad():
            diff = float((loaded(*inputs) - ref).abs().max())
            if has_candidates:
                merged = loaded(*cand[1])
                diff = max(diff, float((loaded.score_candidates(*cand[0]) - merged).abs().max()))
        del loaded
        _pass_gate(tmp, out, diff, tol, len(ref), "the AOTInductor package")
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return diff, tol, seconds


def _what_to_export(model: Any, booster: bool) -> tuple[FeatureSpec, nn.Module]:
    """(the served spec, the tower): the light tower, or the booster on every feature
    (its attention over each sequence: `_attention_to_export`)."""
    spec: FeatureSpec = model.spec
    if not booster:
        check_exportable(spec, model.cfg, "rocket")  # the checks training starts with
        return spec, model.light
    # comparison only: the booster on every feature, packaged the same way
    spec = replace(spec, light_features=tuple(spec.sparse_names + spec.dense_names))
    if model.bottom is not None:
        raise ExportError("--booster export does not support shared_bottom")
    check_servable(spec)
    return spec, _BoosterHead(model.booster)


def _attention_to_export(model: Any, booster: bool) -> nn.ModuleDict | None:
    """The booster's attention units, when the booster is exported on sequences."""
    return model.attention if booster and model.spec.sequences else None


def _table_sources(
    model: Any, spec: FeatureSpec, ct: CheckpointTables, booster: bool
) -> tuple[dict[str, TableSource], int]:
    """Only the tables the exported tower reads, each streamed block by block."""
    tables = list(dict.fromkeys(f.table for f in spec.light_sparse))
    sources: dict[str, TableSource] = {
        t: partial(ct.row_blocks, f"model.{table_weight_key(spec, t)}") for t in tables
    }
    if booster or model.light_ebc is None:
        return sources, 0
    for t in tables:
        name = private_table_name(t)
        sources[name] = partial(ct.row_blocks, f"model.light_ebc.embedding_bags.{name}.weight")
    return sources, int(model.cfg.light_private_dim)


def _manifest(
    spec: FeatureSpec,
    int8: bool,
    meta: dict[str, Any],
    ck: Path,
    booster: bool,
    private_dim: int,
    rate: float,
    portable: bool,
) -> dict[str, Any]:
    return build_manifest(
        spec,
        int8,
        meta.get("metrics", {}),
        {
            "checkpoint": str(ck),
            "step": meta.get("step"),
            "tower": "booster" if booster else "light",
            "light_private_dim": private_dim,
            "negative_sample_rate": rate,
            "calibration": "served probability = sigmoid(logit + log(negative_sample_rate))",
            "op_library": None if portable else op_library_entry(),
        },
    )


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    int8: bool = False,
    data: str | None = None,
    rows: int = 2048,
    booster: bool = False,
    portable: bool = False,
    heldout: pa.Table | None = None,
    fmt: str = "torchscript",
) -> dict[str, Any]:
    """Export; returns a report. Writes nothing unless the parity gate passes. The module
    runs on rocketrec's fused operator unless `portable` (rocketrec.serving.fused).
    `fmt`: "torchscript" (a TorchScript file) or "aoti" (an AOTInductor package,
    rocketrec.serving.aoti; both entry points gated).

    The parity gate scores `heldout` (rows in the spec's columns, from the caller);
    without it, the first `rows` rows of `data` (or synthetic rows when no data)."""
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: one of {', '.join(FORMATS)} expected")
    ck = latest_checkpoint(checkpoint)
    if ck is None:
        raise CheckpointNotFound(f"{checkpoint}: no complete checkpoint found")
    model, meta = load_towers(ck)  # tables stay on disk until streamed below
    if not booster and saved_config(meta, "loss").get("mode") == "booster_only":
        raise ExportError(
            f"{ck}: a booster_only run trained no light tower; export --booster packages the "
            "booster (for comparisons)"
        )
    spec, tower = _what_to_export(model, booster)
    attention = _attention_to_export(model, booster)
    sources, private_dim = _table_sources(model, spec, CheckpointTables(ck), booster)
    table = heldout if heldout is not None else heldout_table(model.spec, data, rows)
    batch = decode_table(table, model.spec, "<held-out>").to_batch()
    needed, dense, kjt, collector = _lookups(model, batch, list(sources))
    rate = float(saved_config(meta, "train").get("negative_sample_rate", 1.0))
    served = serving_module(
        spec,
        sources,
        tower,
        int8,
        private_dim,
        on_block=collector,
        negative_sample_rate=rate,
        portable=portable,
        attention=attention,
    )
    portable = portable or attention is not None
    # reference: the training model's code path on the same rows, corrected the same way
    ref = _reference_scores(model, dense, kjt, booster, needed, collector, np.log(rate))
    private = 0 if booster else model.cfg.light_private_dim
    manifest = _manifest(spec, int8, meta, ck, booster, private, rate, portable)
    out = Path(out)
    inputs = raw_inputs_from_table(table, spec)
    box = [served]
    del served
    extra = _write_format(fmt, box, manifest, out, inputs, ref, table, int8)
    diff, tol = extra.pop("diff"), extra.pop("tol")
    return {
        **extra,
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
