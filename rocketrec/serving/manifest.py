"""manifest.json: what a server needs to build requests for an exported model.

Rides inside the TorchScript file (`torch::jit::load(path, device, extra_files)`).
`sparse_features` are the module's id inputs and `dense_features` its numeric inputs,
in input order; `features` lists what the model computes from them (crosses,
bucketized numbers) for reference: a server never computes those itself.
"""

from pathlib import Path
from typing import Any

import torch

from rocketrec.errors import UserError
from rocketrec.model.preprocess import Preprocess
from rocketrec.spec import ID_KINDS, FeatureSpec, SparseFeature
from rocketrec.spec.hashing import CROSS_TEST_VECTORS, FNV_OFFSET, FNV_PRIME, TEST_VECTORS

FORMAT = "rocketrec-light/2"
FORMATS_READ = ("rocketrec-light/1", "rocketrec-light/2")


def _sparse_entry(spec: FeatureSpec, f: SparseFeature) -> dict[str, Any]:
    t = spec.table(f.table)
    d: dict[str, Any] = {"name": f.name, "kind": f.kind}
    if f.kind == "cross":
        d["inputs"] = list(f.inputs or ())
    else:
        d["column"] = f.column
    if f.kind in ID_KINDS:
        d["dtype"] = f.dtype
    if f.kind == "bucketize":
        d["boundaries"] = list(f.boundaries or ())
    d.update(max_ids=f.max_ids, table=t.name, rows=t.rows, dim=t.dim, pooling=spec.pooling(f))
    return d


def _dense_entry(f: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": f.name, "kind": "dense"}
    d.update({k: v for k, v in vars(f).items() if v is not None and k != "name"})
    return d


def build_manifest(
    spec: FeatureSpec, int8: bool, metrics: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    import pyarrow
    import torchrec

    pre = Preprocess(spec, spec.light_features)
    sparse = {f.name: f for f in spec.sparse}
    numeric: list[dict[str, Any]] = []
    for name in pre.numeric_inputs:
        f = spec.feature(name)
        if isinstance(f, SparseFeature):  # a bucketized number
            numeric.append(_sparse_entry(spec, f))
        else:
            numeric.append(_dense_entry(f))
    return {
        "format": FORMAT,
        "inputs": {
            "values": "int64 [N]: raw ids of all bags, input-major (strings hashed first)",
            "lengths": "int64 [I*B]: bag sizes, input-major in sparse_features order",
            "dense": "float32 [B, C]: raw numbers in dense_features order; NaN = missing",
        },
        "entry_points": {
            "forward(values, lengths, dense)": "float32 [B]: click probability per row",
            "score_candidates(values, lengths, dense)": (
                "float32 [M]: rows as for forward with B = 1 + M: row 0 is one context, rows "
                "1..M its candidates; each input is given by the context (a non-empty bag, a "
                "non-NaN number) or by the candidates; equals forward on the merged rows"
            ),
        },
        "output": "float32 [B]: click probability",
        "sparse_features": [_sparse_entry(spec, f) for f in pre.id_inputs],
        "dense_features": numeric,
        "features": [_sparse_entry(spec, sparse[n]) for n in pre.sparse_outputs]
        + [_dense_entry(spec.feature(n)) for n in pre.dense_outputs],
        "hash": {
            "name": "fnv1a64",
            "definition": "FNV-1a 64 over UTF-8 bytes, offset 0xcbf29ce484222325, prime "
            "0x100000001b3, result as two's-complement int64",
            "offset_basis": FNV_OFFSET,
            "prime": FNV_PRIME,
            "test_vectors": [[s, v] for s, v in TEST_VECTORS],
        },
        "cross_hash": {
            "definition": "h = 0xcbf29ce484222325; for each input id x (int64 as uint64): "
            "h = (h ^ x) * 0x100000001b3 mod 2^64; then fmix64 (h ^= h >> 33; "
            "h *= 0xff51afd7ed558ccd; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53; h ^= h >> 33); "
            "as two's-complement int64. Every combination of the inputs' bags (first input "
            "outermost), then max_ids. Computed inside the module.",
            "test_vectors": [[list(ids), v] for ids, v in CROSS_TEST_VECTORS],
        },
        "bucketize": "id 0 = missing (NaN), else 1 + the number of boundaries <= x, compared "
        "in float32; inside the module",
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


def read_manifest(path: str | Path, check_format: bool = True) -> dict[str, Any]:
    """manifest.json straight from the file's zip archive (no TorchScript load: a fused
    model's manifest is readable without the op library). A manifest of a format this
    rocketrec does not read (`manifest.FORMATS_READ`) is refused, naming the file."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/manifest.json")]
            if not names:
                raise UserError(
                    f"{path}: no manifest.json inside: not a rocketrec export (or a truncated "
                    "or damaged file)"
                )
            man = json.loads(z.read(names[0]))
    except zipfile.BadZipFile as e:
        raise UserError(
            f"{path}: not a model file: neither a TorchScript file nor an AOTInductor package "
            f"opens (not a zip archive, or a truncated or damaged one: {e})"
        ) from e
    if not isinstance(man, dict):
        raise UserError(f"{path}: manifest.json is not a JSON object")
    if check_format:
        check_manifest_format(man, path)
    return dict(man)


def check_manifest_format(man: dict[str, Any], path: str | Path) -> None:
    fmt = man.get("format")
    if fmt not in FORMATS_READ:
        raise UserError(
            f"{path}: manifest format {fmt!r} is not one this rocketrec reads "
            f"({', '.join(FORMATS_READ)}); export the model again with this version"
        )
