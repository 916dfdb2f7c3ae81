"""Feature spec (one package: `types`, `parse`, `hashing`): the YAML an ad engineer writes, parsed once into frozen dataclasses.

YAML stays at the edge. `load_spec(path)` reads the file, rejects unknown keys
(with a "did you mean" hint), duplicate keys, wrong types and dangling
references, and returns a `FeatureSpec`. Every user error is a `SpecError`
(a `ValueError`) whose message names the file, the feature and the field, so
the CLI can print one line and exit non-zero.

Schema (documented with examples in feature_specs/README.md):

    version: 1
    name: ads_ctr
    label: {column: click}
    weight: {column: w}                  # optional
    tables:
      - {name: ads, rows: 100000, dim: 16, pooling: sum}
    sparse:
      - {name: ad_id, column: ad_id, dtype: int64, kind: scalar, table: ads, max_ids: 1}
    dense:
      - {name: price, column: price, fill: 0.0, transform: log1p}
    light:
      features: [ad_id, price]
    teacher: {column: pctr, kind: probability}   # optional: a logged production score

Sequences (kind: sequence) are a user's behaviour history: a list column of ids,
newest first, of which the first `max_len` are kept (the most recent). `query`
names the candidate-side feature whose embedding attends over the history in the
booster (same table, or a table of the same dim). Every feature of a table a
sequence uses is looked up unpooled through TorchRec's EmbeddingCollection.
"""

from rocketrec.spec.parse import load_spec, spec_from_dict
from rocketrec.spec.types import (
    ID_KINDS,
    LIST_KINDS,
    POOLINGS,
    PRIVATE_SUFFIX,
    SPARSE_DTYPES,
    SPARSE_KINDS,
    TEACHER_KINDS,
    TRANSFORMS,
    DenseFeature,
    FeatureSpec,
    SparseFeature,
    SpecError,
    TableSpec,
    float32,
    private_table_name,
)

__all__ = [
    "ID_KINDS",
    "LIST_KINDS",
    "POOLINGS",
    "PRIVATE_SUFFIX",
    "SPARSE_DTYPES",
    "SPARSE_KINDS",
    "TEACHER_KINDS",
    "TRANSFORMS",
    "DenseFeature",
    "FeatureSpec",
    "SparseFeature",
    "SpecError",
    "TableSpec",
    "float32",
    "load_spec",
    "private_table_name",
    "spec_from_dict",
]
