"""Export the light tower, its tables and its preprocessing to TorchScript for C++ serving.

Serving contract (ARCHITECTURE.md "Contracts"), for B requests:

    forward(values int64 [N], lengths int64 [F * B], dense float32 [B, D]) -> float32 [B]

- F = the light tower's sparse features, D = its dense features, both in the
  manifest's order. `lengths` is feature-major (all B bags of feature 0, then
  feature 1, ...), like a KeyedJaggedTensor; `values` are the raw int64 ids
  (string ids hashed with rocketrec.hashing's FNV-1a 64 first).
- Inside: list truncation to `max_ids`, bucketing (`id mod rows`), one
  `embedding_bag` call per embedding dim over a fused table with per-feature
  row offsets (sum; mean pooling divides by the bag length itself, which also
  makes int8 right: the quantized op always sums), raw dense preprocessing
  (NaN = missing -> fill, then the spec transform), the light MLP, sigmoid.
- Inputs are checked (lengths non-negative and summing to len(values), F*B
  lengths, D dense columns) and bad ones raise a clear error.
- Plain torch ops only (the int8 path uses torch's own quantized ops, built
  into libtorch): no torchrec or fbgemm needed at load time.
- `manifest.json` rides inside the file as an extra file.

`export_checkpoint` gathers the light tables from a DCP checkpoint (sharded or
not), builds the module, scripts it, reloads it from disk and refuses to write
the file if its scores differ from the training model's light tower on a
held-out batch by more than 1e-5 (fp32) or the int8 bound.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rocketrec.data.batch import DataError, _decode_sparse, decode_table
from rocketrec.hashing import FNV_OFFSET, FNV_PRIME, TEST_VECTORS
from rocketrec.spec import FeatureSpec, spec_from_dict

FORMAT = "rocketrec-light/1"
FP32_TOL = 1e-5
INT8_TOL = 2e-2
MAX_DIM_GROUPS = 4  # max |p_int8 - p_fp32|; row-wise int8 keeps ~1/255 of each row's range


TableSource = torch.Tensor | Callable[[], Iterable[tuple[int, torch.Tensor]]]
BlockHook = Callable[[str, int, torch.Tensor], None]


def _row_blocks(src: TableSource, rows: int = 1 << 20) -> Iterator[tuple[int, torch.Tensor]]:
    if isinstance(src, torch.Tensor):
        for r0 in range(0, src.shape[0], rows):
            yield r0, src[r0 : r0 + rows]
    else:
        yield from src()


class LightServing(nn.Module):
    """Light tower with its tables and preprocessing; see the module docstring."""

    # attributes (declared for TorchScript and type checkers)
    group_dims: list[int]
    logit_offset: float
    group_has_mean: list[bool]
    feature_rows: torch.Tensor
    feature_offset: torch.Tensor
    is_mean: torch.Tensor
    group_of_feature_t: torch.Tensor
    feature_index: torch.Tensor
    id_cap: torch.Tensor
    col_perm: torch.Tensor
    fill: torch.Tensor
    is_log1p: torch.Tensor
    clip_lo: torch.Tensor
    clip_hi: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    group_index_0: torch.Tensor
    group_index_1: torch.Tensor
    group_index_2: torch.Tensor
    group_index_3: torch.Tensor
    table_fp32_0: torch.Tensor
    table_fp32_1: torch.Tensor
    table_fp32_2: torch.Tensor
    table_fp32_3: torch.Tensor
    table_int8_0: torch.Tensor
    table_int8_1: torch.Tensor
    table_int8_2: torch.Tensor
    table_int8_3: torch.Tensor

    def __init__(
        self,
        spec: FeatureSpec,
        tables: Mapping[str, TableSource],
        tower: nn.Module,
        int8: bool = False,
        num_inputs: int | None = None,
        on_block: BlockHook | None = None,
        negative_sample_rate: float = 1.0,
    ) -> None:
        """tables: name -> full weight [R, D], or a callable yielding (first row, rows)
        blocks in order (streamed from a checkpoint); on_block sees every block.
        negative_sample_rate: the training data's rate; served probabilities are
        corrected to q = p / (p + (1 - p) / r), i.e. sigmoid(logit + log r)."""
        super().__init__()
        self.logit_offset = float(np.log(negative_sample_rate))
        feats = spec.light_sparse
        dense = spec.light_dense
        self.num_features = len(feats)
        # features beyond num_inputs re-read the inputs of the first ones (private tables)
        self.num_inputs = len(feats) if num_inputs is None else num_inputs
        assert self.num_features % self.num_inputs == 0
        self.num_dense = len(dense)
        self.int8 = int8
        # group features by embedding dim: one fused table and one bag call per group
        dims = sorted({spec.table(f.table).dim for f in feats})
        if len(dims) > MAX_DIM_GROUPS:
            raise ValueError(f"the exported tower uses more than {MAX_DIM_GROUPS} embedding dims")
        self.group_dims = dims
        feature_offset = [0] * len(feats)
        group_of = [0] * len(feats)
        members: list[list[int]] = [[] for _ in dims]
        for g, d in enumerate(dims):
            offset = 0
            placed: dict[str, int] = {}
            for i, f in enumerate(feats):
                t = spec.table(f.table)
                if t.dim != d:
                    continue
                if t.name not in placed:  # a table shared by two features is stored once
                    placed[t.name] = offset
                    offset += t.rows
                feature_offset[i] = placed[t.name]
                group_of[i] = g
                members[g].append(i)
            # fused tables, filled block by block (never a second copy of a table):
            # fp32, or row-wise int8 (prepacked with per-row scale and bias)
            width = int(torch.ops.quantized.embedding_bag_byte_prepack(torch.zeros(1, d)).shape[1])
            w = torch.empty(offset, width, dtype=torch.uint8) if int8 else torch.empty(offset, d)
            for name, base in placed.items():
                for r0, blk in _row_blocks(tables[name]):
                    blk = blk.detach().float().cpu().contiguous()
                    if on_block is not None:
                        on_block(name, r0, blk)
                    dst = w[base + r0 : base + r0 + blk.shape[0]]
                    dst.copy_(torch.ops.quantized.embedding_bag_byte_prepack(blk) if int8 else blk)
                    del blk
            self.register_buffer(f"table_fp32_{g}", torch.zeros(0, 0) if int8 else w)
            self.register_buffer(
                f"table_int8_{g}", w if int8 else torch.zeros(0, 0, dtype=torch.uint8)
            )
            self.register_buffer(f"group_index_{g}", torch.tensor(members[g], dtype=torch.int64))
        for g in range(len(dims), MAX_DIM_GROUPS):  # TorchScript wants every name the code uses
            self.register_buffer(f"table_fp32_{g}", torch.zeros(0, 0))
            self.register_buffer(f"table_int8_{g}", torch.zeros(0, 0, dtype=torch.uint8))
            self.register_buffer(f"group_index_{g}", torch.zeros(0, dtype=torch.int64))
        self.register_buffer(
            "feature_rows", torch.tensor([spec.table(f.table).rows for f in feats])
        )
        self.register_buffer("feature_offset", torch.tensor(feature_offset, dtype=torch.int64))
        max_ids = [f.max_ids or 0 for f in feats]
        self.any_max_ids = any(m > 0 for m in max_ids)
        self.register_buffer(
            "is_mean",
            torch.tensor([spec.table(f.table).pooling == "mean" for f in feats], dtype=torch.bool),
        )
        self.register_buffer("group_of_feature_t", torch.tensor(group_of, dtype=torch.int64))
        self.register_buffer("feature_index", torch.arange(len(feats), dtype=torch.int64))
        self.register_buffer(
            "id_cap", torch.tensor([m if m > 0 else 1 << 62 for m in max_ids], dtype=torch.int64)
        )
        pooling_mean = [spec.table(f.table).pooling == "mean" for f in feats]
        self.group_has_mean = [any(pooling_mean[i] for i in m) for m in members]
        # column layout after concatenating groups -> manifest (spec) order
        fdims = [spec.table(f.table).dim for f in feats]
        start = [sum(fdims[:i]) for i in range(len(feats))]
        perm: list[int] = []
        for m in members:
            for i in m:
                perm.extend(range(start[i], start[i] + fdims[i]))
        inverse = [0] * len(perm)
        for pos, column in enumerate(perm):
            inverse[column] = pos
        self.reorder = inverse != list(range(len(perm)))
        self.register_buffer("col_perm", torch.tensor(inverse, dtype=torch.int64))

        # dense preprocessing, vectorised over D columns
        def col(vals: list[float | None]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.float32).reshape(1, len(vals))

        self.register_buffer("fill", col([f.fill for f in dense]))
        self.register_buffer(
            "is_log1p", col([1.0 if f.transform == "log1p" else 0.0 for f in dense]).bool()
        )
        self.register_buffer(
            "clip_lo",
            col(
                [
                    f.min if f.transform == "clip" and f.min is not None else -float("inf")
                    for f in dense
                ]
            ),
        )
        self.register_buffer(
            "clip_hi",
            col(
                [
                    f.max if f.transform == "clip" and f.max is not None else float("inf")
                    for f in dense
                ]
            ),
        )
        self.register_buffer(
            "mean", col([f.mean if f.transform == "standardize" else 0.0 for f in dense])
        )
        self.register_buffer(
            "std", col([f.std if f.transform == "standardize" else 1.0 for f in dense])
        )
        self.tower = tower

    @torch.jit.export
    def preprocess_dense(self, dense: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(dense), self.fill.expand_as(dense), dense)
        x = torch.where(self.is_log1p, torch.log1p(torch.clamp_min(x, 0.0)), x)
        x = torch.maximum(torch.minimum(x, self.clip_hi), self.clip_lo)
        return (x - self.mean) / self.std

    def _group(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature indices, fp32 table, int8 table) of dim group g."""
        if g == 0:
            return self.group_index_0, self.table_fp32_0, self.table_int8_0
        if g == 1:
            return self.group_index_1, self.table_fp32_1, self.table_int8_1
        if g == 2:
            return self.group_index_2, self.table_fp32_2, self.table_int8_2
        return self.group_index_3, self.table_fp32_3, self.table_int8_3

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """values int64 [N], lengths int64 [F*B], dense float32 [B, D] -> probabilities [B]."""
        if dense.dim() != 2 or dense.size(1) != self.num_dense:
            raise ValueError(
                "rocketrec: dense must be float32 [B, "
                + str(self.num_dense)
                + "], got shape "
                + str(list(dense.shape))
            )
        b = dense.size(0)
        f = self.num_inputs
        if values.dim() != 1 or lengths.dim() != 1:
            raise ValueError("rocketrec: values and lengths must be 1-D int64 tensors")
        if lengths.numel() != f * b:
            raise ValueError(
                "rocketrec: lengths must have F*B = "
                + str(f)
                + "*"
                + str(b)
                + " = "
                + str(f * b)
                + " entries (feature-major), got "
                + str(lengths.numel())
            )
        if lengths.numel() > 0 and bool((lengths < 0).any()):
            raise ValueError("rocketrec: lengths must be non-negative")
        if int(lengths.sum()) != values.numel():
            raise ValueError(
                "rocketrec: lengths sum to "
                + str(int(lengths.sum()))
                + " but values has "
                + str(values.numel())
                + " entries"
            )
        if self.num_features != f:
            # light-only private tables: every input bag is looked up once more
            reps = self.num_features // f
            values = values.repeat(reps)
            lengths = lengths.repeat(reps)
            f = self.num_features
        lens2 = lengths.view(f, b)
        feat_of_value = torch.repeat_interleave(self.feature_index, lens2.sum(1))
        if self.any_max_ids and bool((lens2 > self.id_cap.view(f, 1)).any()):
            # keep the first max_ids ids of each bag, as the training reader does
            starts = torch.cumsum(lengths, 0) - lengths
            pos = torch.arange(values.numel()) - torch.repeat_interleave(starts, lengths)
            keep = pos < self.id_cap[feat_of_value]
            values = values[keep]
            feat_of_value = feat_of_value[keep]
            lens2 = torch.minimum(lens2, self.id_cap.view(f, 1))
        rows = (
            torch.remainder(values, self.feature_rows[feat_of_value])
            + self.feature_offset[feat_of_value]
        )
        blocks: list[torch.Tensor] = []
        for g in range(len(self.group_dims)):
            idx, w, packed = self._group(g)
            if len(self.group_dims) == 1:  # one embedding dim: every bag in one call
                glens2 = lens2
                grows = rows
            else:
                glens2 = lens2.index_select(0, idx)
                grows = rows[self.group_of_feature_t[feat_of_value] == g]
            glens = glens2.reshape(-1)
            offsets = torch.cumsum(glens, 0) - glens
            if self.int8:  # always sums (mode is ignored on CPU): mean is done below
                out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                    packed, grows, offsets, False, 0, False, None, None, False
                )
            else:
                out, _, _, _ = torch.embedding_bag(w, grows, offsets, False, 0, False, None, False)
            out = out.view(idx.numel(), b, self.group_dims[g])
            if self.group_has_mean[g]:
                mean = self.is_mean.index_select(0, idx).view(-1, 1, 1)
                denom = torch.clamp_min(glens2, 1).to(out.dtype).unsqueeze(-1)
                out = torch.where(mean, out / denom, out)
            blocks.append(out.transpose(0, 1).reshape(b, -1))  # [B, n_g * d_g]
        emb = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
        if self.reorder:
            emb = emb.index_select(1, self.col_perm)  # back to the manifest's feature order
        parts = [emb]
        if self.num_dense > 0:
            parts = parts + [self.preprocess_dense(dense)]
        logits = self.tower(torch.cat(parts, 1)).view(-1)
        # calibration for negative downsampling in training: + log(rate) (0 without)
        return torch.sigmoid(logits + self.logit_offset)


def build_manifest(
    spec: FeatureSpec, int8: bool, metrics: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    import pyarrow
    import torchrec

    return {
        "format": FORMAT,
        "inputs": {
            "values": "int64 [N]: raw ids of all bags, feature-major (strings hashed first)",
            "lengths": "int64 [F*B]: bag sizes, feature-major in sparse_features order",
            "dense": "float32 [B, D]: raw values in dense_features order; NaN = missing",
        },
        "output": "float32 [B]: click probability",
        "sparse_features": [
            {
                "name": f.name,
                "column": f.column,
                "dtype": f.dtype,
                "kind": f.kind,
                "max_ids": f.max_ids,
                "table": f.table,
                "rows": spec.table(f.table).rows,
                "dim": spec.table(f.table).dim,
                "pooling": spec.table(f.table).pooling,
            }
            for f in spec.light_sparse
        ],
        "dense_features": [
            {k: v for k, v in vars(f).items() if v is not None} for f in spec.light_dense
        ],
        "hash": {
            "name": "fnv1a64",
            "definition": "FNV-1a 64 over UTF-8 bytes, offset 0xcbf29ce484222325, prime "
            "0x100000001b3, result as two's-complement int64",
            "offset_basis": FNV_OFFSET,
            "prime": FNV_PRIME,
            "test_vectors": [[s, v] for s, v in TEST_VECTORS],
        },
        "bucketing": "row = id mod rows (non-negative), inside the module",
        "int8": int8,
        "spec": spec.to_dict(),
        "metrics": metrics,
        "versions": {
            "torch": torch.__version__,
            "torchrec": getattr(torchrec, "__version__", "unknown"),
            "pyarrow": pyarrow.__version__,
            "rocketrec": _version(),
        },
        **extra,
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rocketrec")
    except Exception:
        return "unknown"


def with_private_tables(spec: FeatureSpec, private_dim: int) -> FeatureSpec:
    """Serving view of a spec whose light tower also reads private tables: each light
    sparse feature gets a twin `NAME__light` on table `TABLE__light` (same column)."""
    from rocketrec.model.model import private_table_name
    from rocketrec.spec import SparseFeature, TableSpec

    light = spec.light_sparse
    used = list(dict.fromkeys(f.table for f in light))
    tables = tuple(
        TableSpec(private_table_name(t), spec.table(t).rows, private_dim, spec.table(t).pooling)
        for t in used
    )
    twins = tuple(
        SparseFeature(
            f"{f.name}__light", f.column, private_table_name(f.table), f.dtype, f.kind, f.max_ids
        )
        for f in light
    )
    names = [f.name for f in light] + [t.name for t in twins] + [f.name for f in spec.light_dense]
    return replace(
        spec,
        tables=spec.tables + tables,
        sparse=spec.sparse + twins,
        light_features=tuple(names),
    )


def script_serving(
    spec: FeatureSpec,
    tables: Mapping[str, TableSource],
    tower: nn.Module,
    int8: bool,
    num_inputs: int | None = None,
    on_block: BlockHook | None = None,
    negative_sample_rate: float = 1.0,
) -> torch.jit.ScriptModule:
    m = LightServing(
        spec, tables, _copy_tower(tower), int8, num_inputs, on_block, negative_sample_rate
    )
    m.eval()
    return torch.jit.script(m)


def _copy_tower(tower: nn.Module) -> nn.Module:
    import copy

    t = copy.deepcopy(tower).cpu().float().eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


# -- raw request tensors (the Python twin of the C++ request builder) ---------------


def raw_inputs_from_table(
    table: pa.Table, spec: FeatureSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arrow rows -> (values, lengths, dense) as a serving client sends them (no transforms)."""
    values, lengths = [], []
    for sf in spec.light_sparse:
        col = table.column(sf.column).combine_chunks()
        ids, offsets = _decode_sparse(col, replace(sf, max_ids=None), "<request>")
        values.append(ids)
        lengths.append(np.diff(offsets))
    dense_cols = []
    for f in spec.light_dense:
        col = table.column(f.column).combine_chunks().cast(pa.float32())
        dense_cols.append(col.to_numpy(zero_copy_only=False).astype(np.float32))  # null -> NaN
    n = table.num_rows
    dense = np.stack(dense_cols, 1) if dense_cols else np.zeros((n, 0), np.float32)
    return (
        torch.from_numpy(np.concatenate(values).astype(np.int64)),
        torch.from_numpy(np.concatenate(lengths).astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(dense)),
    )


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


def _lookups(model: Any, batch: Any, gathered: list[str]) -> tuple[dict, dict, _RowCollector]:
    """Rows of each table that `batch` looks up, and a collector for the gathered tables."""

    spec: FeatureSpec = model.spec
    raw = batch.sparse.to_dict()
    bucketed = {
        f.name: torch.remainder(raw[f.name].values(), spec.table(f.table).rows).numpy()
        for f in spec.sparse
    }
    needed: dict[str, np.ndarray] = {t.name: np.zeros(0, np.int64) for t in spec.tables}
    for f in spec.sparse:
        needed[f.table] = np.union1d(needed[f.table], bucketed[f.name])
    dims = {t.name: t.dim for t in spec.tables}
    want: dict[str, np.ndarray] = {}
    for name in gathered:
        base = name[: -len("__light")] if name.endswith("__light") else name
        want[name] = needed[base]
        dims[name] = dims[base] if name == base else model.cfg.light_private_dim
    return needed, bucketed, _RowCollector(want, dims)


def _reference_scores(
    model: Any,
    batch: Any,
    booster: bool,
    needed: dict,
    bucketed: dict,
    rows: _RowCollector,
    logit_offset: float = 0.0,
) -> torch.Tensor:
    """Scores of the training model's code path on `batch`, from the looked-up rows only.

    The reference model has compact tables (one row per row the batch looks up)
    and receives compact ids, so `id mod rows` is the identity there; everything
    else (torchrec pooling, dense preprocessing, towers) is the training code.
    Tables that were not gathered (booster-only ones in a light export) stay
    zero: the tower scored does not read them.
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
    values = [
        torch.from_numpy(np.searchsorted(needed[f.table], bucketed[f.name]).astype(np.int64))
        for f in spec.sparse
    ]
    compact = KeyedJaggedTensor(
        keys=batch.sparse.keys(), values=torch.cat(values), lengths=batch.sparse.lengths()
    )
    ref.eval()
    with torch.no_grad():
        o = ref(batch.dense, compact)  # both towers (the plan's default); one is used
    return torch.sigmoid((o.booster if booster else o.light) + logit_offset)


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
) -> dict[str, Any]:
    """Export; returns a report. Writes nothing unless the parity gate passes."""
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
    else:
        if model.bottom is not None:
            raise ValueError("export does not support shared_bottom yet: train without it")
        tower = model.light
    ct = CheckpointTables(ck)
    # only the tables the exported tower reads are gathered, one at a time, block by block
    sources: dict[str, TableSource] = {
        t: partial(ct.row_blocks, f"model.ebc.embedding_bags.{t}.weight")
        for t in dict.fromkeys(f.table for f in spec.light_sparse)
    }
    serve_spec, num_inputs = spec, None
    if not booster and model.light_ebc is not None:
        serve_spec = with_private_tables(spec, model.cfg.light_private_dim)
        num_inputs = len(spec.light_sparse)
        for t in serve_spec.tables[len(spec.tables) :]:
            sources[t.name] = partial(
                ct.row_blocks, f"model.light_ebc.embedding_bags.{t.name}.weight"
            )
    table = _heldout_table(model.spec, data, rows)
    batch = decode_table(table, model.spec, "<held-out>").to_batch()
    needed, bucketed, collector = _lookups(model, batch, list(sources))
    rate = float(meta.get("train_config", {}).get("negative_sample_rate", 1.0))
    scripted = script_serving(
        serve_spec, sources, tower, int8, num_inputs, on_block=collector, negative_sample_rate=rate
    )
    # reference: the training model's code path on the same rows, corrected the same way
    ref = _reference_scores(model, batch, booster, needed, bucketed, collector, np.log(rate))
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


# -- JSON-lines requests (Python twin of deploy/cpp's rocketrec_predict) ---------------


def read_manifest(model_path: str | Path) -> dict[str, Any]:
    extra = {"manifest.json": ""}
    torch.jit.load(str(model_path), _extra_files=extra)
    return json.loads(extra["manifest.json"])


def parse_requests(lines: list[str], manifest: dict[str, Any], source: str = "<requests>"):
    """JSON lines -> (values, lengths, dense). Errors name the line and the feature."""
    from rocketrec.hashing import fnv1a64

    feats = manifest["sparse_features"]
    dfeats = manifest["dense_features"]
    names = {f["name"]: i for i, f in enumerate(feats)}
    dnames = {f["name"]: i for i, f in enumerate(dfeats)}
    reqs = []
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{ln}: bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}:{ln}: a request must be a JSON object")
        bags: list[list[int]] = [[] for _ in feats]
        dense = [float("nan")] * len(dfeats)
        items = dict(obj)
        if "sparse" in items or "dense" in items and isinstance(items.get("dense"), list):
            sp = items.pop("sparse", {})
            dv = items.pop("dense", None)
            if items:
                raise DataError(
                    f"{source}:{ln}: unexpected key(s) {sorted(items)} beside 'sparse'/'dense'"
                )
            if not isinstance(sp, dict):
                raise DataError(f"{source}:{ln}: 'sparse' must be an object")
            if dv is not None:
                if not isinstance(dv, list) or len(dv) != len(dfeats):
                    raise DataError(
                        f"{source}:{ln}: 'dense' must be a list of {len(dfeats)} numbers "
                        f"({', '.join(dnames)}), got {len(dv) if isinstance(dv, list) else type(dv).__name__}"
                    )
                for i, v in enumerate(dv):  # null = missing -> the feature's fill
                    dense[i] = float("nan") if v is None else _num(v, source, ln, dfeats[i]["name"])
            items = sp
        for k, v in items.items():
            if k in names:
                f = feats[names[k]]
                vals = v if isinstance(v, list) else [v]
                if v is None:
                    vals = []
                for x in vals:
                    if f["dtype"] == "string":
                        if not isinstance(x, str):
                            raise DataError(
                                f"{source}:{ln}: feature '{k}' expects string ids, got {x!r}"
                            )
                        bags[names[k]].append(fnv1a64(x))
                    else:
                        if isinstance(x, bool) or not isinstance(x, int):
                            raise DataError(
                                f"{source}:{ln}: feature '{k}' expects int64 ids, got {x!r}"
                            )
                        if not -(1 << 63) <= x < (1 << 63):
                            raise DataError(
                                f"{source}:{ln}: feature '{k}': id {x} does not fit int64"
                            )
                        bags[names[k]].append(x)
            elif k in dnames:
                dense[dnames[k]] = float("nan") if v is None else _num(v, source, ln, k)
            else:
                raise DataError(
                    f"{source}:{ln}: unknown feature '{k}' (the model reads: "
                    f"{', '.join(list(names) + list(dnames))})"
                )
        reqs.append((bags, dense))
    if not reqs:
        raise DataError(f"{source}: no requests")
    b = len(reqs)
    values: list[int] = []
    lengths: list[int] = []
    for fi in range(len(feats)):
        for bags, _ in reqs:
            values.extend(bags[fi])
            lengths.append(len(bags[fi]))
    dense_t = torch.tensor([d for _, d in reqs], dtype=torch.float32).reshape(b, len(dfeats))
    return (
        torch.tensor(values, dtype=torch.int64),
        torch.tensor(lengths, dtype=torch.int64),
        dense_t,
    )


def _num(v: Any, source: str, ln: int, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DataError(f"{source}:{ln}: dense feature '{name}' expects a number, got {v!r}")
    return float(v)


# -- CLI ----------------------------------------------------------------------------


def _cmd_export(a: argparse.Namespace) -> int:
    t = time.time()
    rep = export_checkpoint(a.checkpoint, a.out, int8=a.int8, data=a.data, rows=a.rows)
    print(
        f"exported {rep['out']} ({rep['bytes']:,} bytes, {'int8' if rep['int8'] else 'fp32'}): "
        f"parity max |diff| {rep['max_abs_diff']:.3g} <= {rep['tolerance']:g} on "
        f"{rep['rows_checked']} held-out rows; {time.time() - t:.1f}s"
    )
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    import sys

    manifest = read_manifest(a.model)
    model = torch.jit.load(a.model)
    src = a.requests
    lines = sys.stdin.read().splitlines() if src == "-" else Path(src).read_text().splitlines()
    values, lengths, dense = parse_requests(lines, manifest, "<stdin>" if src == "-" else src)
    with torch.no_grad():
        try:
            p = model(values, lengths, dense)
        except Exception as e:  # the module's own input checks
            raise DataError(str(e).strip().splitlines()[-1]) from None
    for x in p.tolist():
        print(f"{x:.9g}")
    return 0


def requests_from_table(table: pa.Table, manifest: dict[str, Any]) -> list[str]:
    """Parquet rows -> JSON-lines requests in the named form (what a serving client sends)."""
    lines = []
    for row in table.to_pylist():
        req = {f["name"]: row.get(f["column"]) for f in manifest["sparse_features"]}
        req.update({f["name"]: row.get(f["column"]) for f in manifest["dense_features"]})
        lines.append(json.dumps(req))
    return lines


def _cmd_requests(a: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from rocketrec.data.reader import list_parquet_files

    if a.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {a.rows}")
    manifest = read_manifest(a.model)
    fs, files = list_parquet_files(a.data)
    cols = sorted({f["column"] for f in manifest["sparse_features"] + manifest["dense_features"]})
    lines: list[str] = []
    for f in files:  # row groups in order, across files, until --rows requests
        pf = pq.ParquetFile(fs.open_input_file(f))
        for rg in range(pf.metadata.num_row_groups):
            if len(lines) >= a.rows:
                break
            table = pf.read_row_group(rg, columns=cols)
            lines += requests_from_table(table.slice(0, a.rows - len(lines)), manifest)
        if len(lines) >= a.rows:
            break
    text = "\n".join(lines) + "\n"
    if a.out == "-":
        print(text, end="")
    else:
        Path(a.out).write_text(text)
        print(f"wrote {len(lines)} requests to {a.out}")
    if len(lines) < a.rows:
        print(
            f"rocketrec: note: {a.data} holds only {len(lines)} rows: wrote {len(lines)} of the "
            f"{a.rows} requests asked for",
            file=sys.stderr,
        )
    return 0


def add_export_commands(sub: Any) -> None:
    e = sub.add_parser("export", help="export the light tower to TorchScript for C++ serving")
    e.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    e.add_argument("--out", required=True, help="output file, e.g. light.pt")
    e.add_argument("--int8", action="store_true", help="row-wise int8 tables")
    e.add_argument("--data", default=None, help="Parquet for the parity check (default: synthetic)")
    e.add_argument("--rows", type=int, default=2048, help="held-out rows for the parity check")
    e.set_defaults(fn=_cmd_export)
    p = sub.add_parser("predict", help="score JSON-lines requests with an exported model")
    p.add_argument("--model", required=True, help="exported .pt file")
    p.add_argument("--requests", required=True, help="JSON-lines file, or - for stdin")
    p.set_defaults(fn=_cmd_predict)
    r = sub.add_parser("requests", help="write JSON-lines requests for a model from Parquet rows")
    r.add_argument(
        "--model", required=True, help="exported .pt file (its manifest names the features)"
    )
    r.add_argument("--data", required=True, help="Parquet file, directory or glob")
    r.add_argument("--rows", type=int, default=16, help="how many rows")
    r.add_argument("--out", default="-", help="output file, or - for stdout")
    r.set_defaults(fn=_cmd_requests)
