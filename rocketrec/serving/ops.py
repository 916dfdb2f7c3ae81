"""The fused serving operator's Python side: load the library, describe a model to it.

The operator (`torch.ops.rocketrec.*`, source `deploy/cpp/rocketrec_ops.cpp`) is built
by the package's install (setup.py -> `rocketrec/_rocketrec_ops.so`) and by CMake for C++
servers (`deploy/cpp/build/librocketrec_ops.so`); `ROCKETREC_OPS_LIBRARY=PATH` picks
another build. `pack_config` turns a `LightServing` (portable module: preprocessing, fused
tables, tower) into the operator's two config tensors:

    icfg int64: format, I, Kb, D, F, L, G, K, NC,
                id caps [I] (0 = none), bucket bound offsets [Kb+1],
                outputs [F x (kind 0 id / 1 cross / 2 bucket, index)],
                cross caps [NC], cross source offsets [NC+1], cross sources,
                lookups [L x (output, rows, row offset, group, mean, column, dim)],
                group dims [G]
    fcfg float32: bucket boundaries, then per dense feature (fill, log1p, clip lo, clip hi,
                scale, shift)

Legend: I id inputs, Kb bucketized inputs, D dense outputs, F sparse outputs, L lookups
(F, or 2F with private twins), G fused tables, K tower input width, NC crosses.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from rocketrec.errors import UserError

OPS_VERSION = 2  # the operator version this package's modules call (rocketrec_ops.cpp)
CONFIG_FORMAT = 1
LIBRARY_NAME = "librocketrec_ops.so"
_loaded: str | None = None


class OpsLibraryError(UserError):
    """The op library is missing, not built, or of another version."""


def library_path() -> Path:
    """Where the op library is: ROCKETREC_OPS_LIBRARY; else this package's own build
    (`rocketrec/_rocketrec_ops.so`); else the one of another copy of the package later on
    sys.path (a Ray `--working-dir` puts a source copy, without the git-ignored build,
    first on the path: the installed package behind it has the library); else one built
    by CMake beside the source (`deploy/cpp/build`)."""
    env = os.environ.get("ROCKETREC_OPS_LIBRARY")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("rocketrec._rocketrec_ops")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin)
    for entry in sys.path:
        cand = Path(entry or ".") / "rocketrec" / "_rocketrec_ops.so"
        if cand.is_file():
            return cand
    built = Path(__file__).resolve().parents[2] / "deploy" / "cpp" / "build" / LIBRARY_NAME
    if built.is_file():
        return built
    raise OpsLibraryError(
        "rocketrec's op library (rocketrec/_rocketrec_ops.so) is not built and no installed "
        "copy of rocketrec has it: install rocketrec on every node (`make venv`, or `pip "
        "install --no-build-isolation .`: the install builds it), or set "
        f"ROCKETREC_OPS_LIBRARY to a {LIBRARY_NAME} built by deploy/cpp (CMake)"
    )


def load_library() -> str:
    """Load the operator library once (idempotent); returns its path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = library_path()
    if not path.is_file():
        raise OpsLibraryError(f"{path}: rocketrec op library not found ({LIBRARY_NAME})")
    try:
        torch.ops.load_library(str(path))
        # its symbols global: an AOTInductor package calls the operators' C shims by name
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise OpsLibraryError(f"{path}: cannot load the rocketrec op library: {e}") from e
    got = int(torch.ops.rocketrec.version())
    if got != OPS_VERSION:
        raise OpsLibraryError(
            f"{path}: rocketrec op library version {got}, this package needs {OPS_VERSION}"
        )
    _register_fakes()
    _loaded = str(path)
    return _loaded


def op_library_entry() -> dict[str, Any]:
    """The manifest's `op_library`: what a server must load before torch::jit::load."""
    return {
        "name": LIBRARY_NAME,
        "namespace": "rocketrec",
        "version": OPS_VERSION,
        "ops": [
            "rocketrec::light_features",
            "rocketrec::light_features_context",
            "rocketrec::light_first_layer",
            "rocketrec::light_first_layer_context",
        ],
        "load": "link librocketrec_ops.so with -Wl,--no-as-needed, or dlopen it before "
        "torch::jit::load (deploy/README.md); export --portable needs no library",
    }


def verify_model_file(path: str | Path) -> None:
    """Every record of a model file (TorchScript files and AOTInductor packages are zip
    archives) against the CRC-32 its writer stored, as the C++ Predictor does at load
    (deploy/README.md): torch.jit.load does not check them, and a damaged table would be
    served with wrong scores. UserError naming the file (and the damaged record). Skipped
    when the environment has ROCKETREC_VERIFY_MODEL=0."""
    import zipfile

    if os.environ.get("ROCKETREC_VERIFY_MODEL") == "0":
        return
    if not Path(path).is_file():
        raise UserError(f"{path}: cannot open: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise UserError(
            f"{path}: not a model file: neither a TorchScript file nor an AOTInductor package "
            f"opens (not a zip archive, or a truncated or damaged one: {e})"
        ) from None
    if bad is not None:
        raise UserError(
            f"{path}: record '{bad}' is damaged (its CRC-32 does not match the archive's): "
            "copy or export the model again"
        )


def load_model(path: str | Path) -> Any:
    """Load an exported model (torch.jit.load, or an AOTInductor package as
    rocketrec.serving.aoti.AotiModel: the same calls), loading the op library first when
    its manifest says it needs it (a clear OpsLibraryError naming the library if missing).
    The file's records are checked first (verify_model_file)."""
    from rocketrec.serving.manifest import check_manifest_format, read_manifest

    verify_model_file(path)
    man = read_manifest(path, check_format=False)  # a missing library is said first
    if man.get("op_library"):
        try:
            load_library()
        except OpsLibraryError as e:
            raise OpsLibraryError(
                f"{path} runs on rocketrec's fused operator and needs {LIBRARY_NAME}: {e}"
            ) from e
        want = man["op_library"].get("version")
        if want != OPS_VERSION:  # as the C++ Predictor: the versions must be equal
            raise OpsLibraryError(
                f"{path}: the model needs rocketrec op library version {want}, the loaded "
                f"{LIBRARY_NAME} is version {OPS_VERSION}: export it again with this rocketrec"
            )
    check_manifest_format(man, path)
    from rocketrec.serving.aoti import AotiModel, is_package

    if is_package(path):
        return AotiModel(path)
    try:
        return torch.jit.load(str(path))
    except RuntimeError as e:
        if "rocketrec::" in str(e):  # a file whose manifest did not say (hand-made)
            raise OpsLibraryError(
                f"{path} calls rocketrec's fused operator: load {LIBRARY_NAME} first "
                f"(rocketrec.serving.ops.load_library): {str(e).strip().splitlines()[0]}"
            ) from None
        raise


def try_load_library() -> None:
    """Load the op library if it is there (so torch.jit.load reads fused models)."""
    try:
        load_library()
    except OpsLibraryError:
        pass


def _register_fakes() -> None:
    """Shape functions for torch.export / FakeTensor (light_features has a C++ Meta kernel;
    these two have data-dependent sizes)."""

    @torch.library.register_fake("rocketrec::preprocess")
    def _pre(values, lengths, dense, icfg, fcfg, context):  # type: ignore[no-untyped-def]
        ctx = torch.library.get_ctx()
        n = ctx.new_dynamic_size()
        return (
            values.new_empty([n]),
            lengths.new_empty([ctx.new_dynamic_size()]),
            dense.new_empty([dense.shape[0], ctx.new_dynamic_size()]),
        )

    @torch.library.register_fake("rocketrec::light_features_context")
    def _ctx(values, lengths, dense, icfg, fcfg, tables, int8):  # type: ignore[no-untyped-def]
        ctx = torch.library.get_ctx()
        k = ctx.new_dynamic_size()
        kc = ctx.new_dynamic_size()
        return (
            dense.new_empty([1, k]),
            dense.new_empty([dense.shape[0] - 1, kc]),
            values.new_empty([kc]),
        )


def pack_config(serving: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(icfg, fcfg) of a `rocketrec.serving.module.LightServing` (module docstring)."""
    pre = serving.preprocess
    ids = pre.id_inputs
    caps = [0 if c >= 1 << 62 else int(c) for c in pre.id_cap.tolist()]
    n_id_out = len(pre.id_out_index)
    outputs: list[int] = []
    for i in pre.id_out_index.tolist():
        outputs += [0, int(i)]
    for c in range(len(pre.cross_src)):
        outputs += [1, c]
    for k in pre.bucket_out:
        outputs += [2, int(k)]
    assert len(outputs) == 2 * pre.num_out and n_id_out + len(pre.cross_src) <= pre.num_out
    cross_start = [0]
    for src in pre.cross_src:
        cross_start.append(cross_start[-1] + len(src))
    rows, offsets = pre.out_rows.tolist(), pre.out_offset.tolist()
    group_of = serving.group_of_feature.tolist()
    lookups: list[int] = []
    for ell, (col, dim) in enumerate(serving.lookup_layout):
        out = ell % pre.num_out  # twins repeat the outputs
        mean = int(serving.feature_pooling[ell])
        lookups += [out, rows[ell], offsets[ell], group_of[ell], mean, col, dim]
    head = [
        CONFIG_FORMAT,
        len(ids),
        pre.num_buckets,
        pre.num_dense,
        pre.num_out,
        len(serving.lookup_layout),
        len(serving.group_dims),
        serving.tower_in_dim,
        len(pre.cross_src),
    ]
    icfg = (
        head
        + caps
        + list(pre.bucket_bounds)
        + outputs
        + list(pre.cross_cap)
        + cross_start
        + [s for src in pre.cross_src for s in src]
        + lookups
        + list(serving.group_dims)
    )
    dense = torch.cat(
        [
            pre.fill,
            pre.is_log1p.float(),
            pre.clip_lo,
            pre.clip_hi,
            pre.scale,
            pre.shift,
        ]
    )  # [6, D]
    fcfg = torch.cat([pre.boundaries.float(), dense.t().reshape(-1)])
    return torch.tensor(icfg, dtype=torch.int64), fcfg.contiguous()
