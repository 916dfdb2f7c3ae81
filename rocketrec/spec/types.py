"""The feature spec's types: frozen dataclasses, the kinds each field accepts, and the
names derived from them (private light tables). Parsing: `rocketrec.spec.parse`."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from rocketrec.errors import UserError

SPEC_VERSION = 1
POOLINGS = ("sum", "mean")
SPARSE_DTYPES = ("int64", "string")
SPARSE_KINDS = ("scalar", "list", "cross", "bucketize", "sequence")
ID_KINDS: tuple[str, ...] = ("scalar", "list", "sequence")  # kinds read from an id column
LIST_KINDS: tuple[str, ...] = ("list", "sequence")  # kinds read from a list column
TEACHER_KINDS = ("probability", "logit")
TRANSFORMS = ("none", "log1p", "clip", "standardize")


class SpecError(UserError):
    """A user error in a feature spec; the message names file, feature and field."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    pooling: str = "sum"


@dataclass(frozen=True)
class SparseFeature:
    """An id feature looked up in `table`.

    kind scalar/list: raw ids from `column` (int64, or strings hashed with FNV-1a 64).
    kind cross: no column; the ids are `rocketrec.spec.hashing.cross_hash` of one id from
    each of `inputs` (other sparse features), every combination of their bags.
    kind bucketize: a numeric `column` cut at `boundaries`; id 0 = null/NaN,
    id i + 1 = the number i of boundaries <= x (compared in float32).
    kind sequence: a list `column` of ids, newest first; `max_ids` holds the spec's
    `max_len` (the first, most recent ids are kept); `query` names the candidate-side
    feature that attends over it in the booster. The light tower, if it lists a
    sequence, reads it as a mean-pooled bag.
    All of them are computed inside the model (rocketrec.model.preprocess).
    """

    name: str
    column: str  # "" for kind cross
    table: str
    dtype: str = "int64"  # "int64" | "string" (strings are hashed, see rocketrec.spec.hashing)
    kind: str = "scalar"  # "scalar" | "list" (multi-hot) | "cross" | "bucketize"
    max_ids: int | None = None  # keep at most this many ids per example (list/cross features)
    inputs: tuple[str, ...] | None = None  # kind cross: the crossed features, in order
    boundaries: tuple[float, ...] | None = None  # kind bucketize: strictly increasing
    query: str | None = None  # kind sequence: the feature attending over the history

    @property
    def is_list(self) -> bool:
        """Read from a list column (multi-hot bags and sequences)."""
        return self.kind in LIST_KINDS


@dataclass(frozen=True)
class DenseFeature:
    """A float feature: nulls become `fill`, then `transform` applies.

    Transforms: none; log1p = log(1 + max(x, 0)); clip to [min, max];
    standardize = (x - mean) / std.
    """

    name: str
    column: str
    fill: float = 0.0
    transform: str = "none"
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    version: int
    label_column: str
    weight_column: str | None
    tables: tuple[TableSpec, ...]
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...]
    light_features: tuple[str, ...]
    source: str = field(default="<memory>", compare=False)
    group_column: str | None = None  # e.g. the user id: evaluation reports grouped AUC
    # a logged production score (probability or logit) the light tower distils from;
    # never an input of either tower and never served
    teacher_column: str | None = None
    teacher_kind: str = "probability"

    # -- derived views ---------------------------------------------------------
    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def id_features(self) -> list[SparseFeature]:
        """Sparse features read from an id column (kind scalar or list)."""
        return [f for f in self.sparse if f.kind in ID_KINDS]

    @property
    def sequences(self) -> list[SparseFeature]:
        return [f for f in self.sparse if f.kind == "sequence"]

    @property
    def sequence_tables(self) -> list[str]:
        """Tables a sequence uses, in spec order: held by the EmbeddingCollection."""
        used = {f.table for f in self.sequences}
        return [t.name for t in self.tables if t.name in used]

    @property
    def unpooled_features(self) -> list[SparseFeature]:
        """Every feature of a sequence table (looked up unpooled, then pooled or attended)."""
        tables = set(self.sequence_tables)
        return [f for f in self.sparse if f.table in tables]

    @property
    def pooled_features(self) -> list[SparseFeature]:
        """Features looked up by the EmbeddingBagCollection (tables without sequences)."""
        tables = set(self.sequence_tables)
        return [f for f in self.sparse if f.table not in tables]

    def pooling(self, f: SparseFeature) -> str:
        """How feature `f` is pooled into a bag: a sequence read as a bag is a mean."""
        return "mean" if f.kind == "sequence" else self.table(f.table).pooling

    @property
    def bucket_features(self) -> list[SparseFeature]:
        return [f for f in self.sparse if f.kind == "bucketize"]

    def feature(self, name: str) -> SparseFeature | DenseFeature:
        for sf in self.sparse:
            if sf.name == name:
                return sf
        for df in self.dense:
            if df.name == name:
                return df
        raise KeyError(name)

    @property
    def light_sparse(self) -> list[SparseFeature]:
        keep = set(self.light_features)
        return [f for f in self.sparse if f.name in keep]

    @property
    def light_dense(self) -> list[DenseFeature]:
        keep = set(self.light_features)
        return [f for f in self.dense if f.name in keep]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def columns(self) -> list[str]:
        cols = [self.label_column]
        if self.weight_column:
            cols.append(self.weight_column)
        if self.group_column and self.group_column not in cols:
            cols.append(self.group_column)
        if self.teacher_column:
            cols.append(self.teacher_column)
        for column in [f.column for f in self.sparse] + [f.column for f in self.dense]:
            if column and column not in cols:
                cols.append(column)
        return cols

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form that `spec_from_dict` reads back (checkpoints, manifests)."""
        d: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "label": {"column": self.label_column},
            "tables": [vars(t).copy() for t in self.tables],
            "sparse": [_sparse_dict(f) for f in self.sparse],
            "dense": [{k: v for k, v in vars(f).items() if v is not None} for f in self.dense],
            "light": {"features": list(self.light_features)},
        }
        if self.weight_column:
            d["weight"] = {"column": self.weight_column}
        if self.group_column:
            d["group"] = {"column": self.group_column}
        if self.teacher_column:
            d["teacher"] = {"column": self.teacher_column, "kind": self.teacher_kind}
        return d


PRIVATE_SUFFIX = "__light"


def table_name_ok(name: str) -> bool:
    """A table name must be usable as a key of TorchRec's ModuleDict of tables: no '.',
    not an attribute of nn.ModuleDict ('items', 'keys', 'values', 'forward', ...)."""
    if not name or "." in name:
        return False
    import torch

    return not hasattr(torch.nn.ModuleDict(), name)


def float32(x: float) -> float:
    """x rounded to float32 (as the model compares numbers)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def private_table_name(table: str) -> str:
    """Name of the light tower's private table beside shared table `table` (and of a
    light feature's private twin)."""
    return f"{table}{PRIVATE_SUFFIX}"


def _sparse_dict(f: SparseFeature) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in vars(f).items():
        if v is None or (k == "column" and f.kind == "cross"):
            continue
        if k == "max_ids" and f.kind == "sequence":
            k = "max_len"
        if k == "dtype" and f.kind not in ID_KINDS:
            continue
        d[k] = list(v) if isinstance(v, tuple) else v
    return d
