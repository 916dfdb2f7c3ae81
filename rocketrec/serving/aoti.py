"""The AOTInductor package (`export --format aoti`): the same served module compiled ahead
of time to C++ through torch.export, one `.pt2` file.

    light.pt2 (a PT2 archive: a zip written by torch.export.pt2_archive)
        <name>/data/aotinductor/forward/...            compiled forward(values, lengths, dense)
        <name>/data/aotinductor/score_candidates/...   compiled score_candidates(...)
        <name>/data/rocketrec/constants.pt             every weight and table, once: torch.save
                                                       of {entry point: {constant: tensor}}
                                                       (both entry points' dicts share storage)
        <name>/extra/manifest.json                     the manifest (read without loading)

Both entry points are exported with dynamic sizes (rows B >= 1, or 1 context + M >= 1
candidates; any number of ids N), call rocketrec's fused operator as a custom op (its
Meta kernels give the shapes: deploy/cpp/rocketrec_ops.cpp) and are compiled by
AOTInductor (a C++ compiler runs: tens of seconds). The weights are kept out of the
compiled libraries (`package_constants_in_so=False`): one file holds them once, and a
loader gives both entry points the same tensors (`load_constants(..., user_managed=True)`),
so the tables are held once in memory. A C++ server reads `data/rocketrec/constants.pt` with
`torch::pickle_load` (deploy/README.md); the C++ twin is `rocketrec::Predictor`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# names of the two compiled entry points inside the package
FORWARD, CANDIDATES = "forward", "score_candidates"
CONSTANTS, MANIFEST = "data/rocketrec/constants.pt", "extra/manifest.json"  # records in the archive
MAX_ROWS = 1 << 20  # the largest batch (rows) a compiled entry point accepts

_COMPILE_OPTIONS = {
    # single-threaded kernels: a server runs requests side by side (one runner per thread,
    # deploy/README.md), and an OpenMP region costs two futex calls even on one thread
    # (about 1 us each here: a third of the light tower's time at batch 1)
    "cpp.threads": 1,
    "aot_inductor.package": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
}


class _Entry(nn.Module):
    """One entry point of the served module as a `forward` torch.export can trace."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.m, self.method = module, method

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        return getattr(self.m, self.method)(values, lengths, dense)  # type: ignore[no-any-return]


def _dynamic(inputs: tuple[torch.Tensor, ...], min_rows: int, name: str) -> dict[str, Any]:
    """Dynamic sizes: rows, and lengths = inputs x rows (input-major), ids free."""
    from torch.export import Dim

    values, lengths, dense = inputs
    n_inputs = lengths.shape[0] // max(1, dense.shape[0])
    rows = Dim(f"{name}_rows", min=min_rows, max=MAX_ROWS)
    ids = Dim(f"{name}_ids", min=0, max=1 << 40)
    return {
        "values": {0: ids} if n_inputs else None,  # no id inputs: always empty
        "lengths": {0: n_inputs * rows} if n_inputs else None,
        "dense": {0: rows},
    }


def _trace_example(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs with at least 2 ids: torch.export specializes a size seen as 0
    or 1 to that constant, and the compiled model would then refuse any other number of
    ids (a held-out sample whose only id input is the context's one id, or whose ids are
    all null, gives such an example). The extra ids join the bag that holds the one id (a
    context's bag stays the context's: no input given twice), else the first row's bag
    of the first id input."""
    values, lengths, dense = inputs
    rows = max(1, dense.shape[0])
    if lengths.shape[0] < rows or values.shape[0] >= 2:
        return inputs
    extra = 2 - values.shape[0]
    given = torch.nonzero(lengths).flatten()
    j = int(given[0]) if given.numel() else 0  # input-major: (input, row) of that bag
    lengths = lengths.clone()
    lengths[j] += extra
    return torch.cat([values.new_zeros(extra), values]), lengths, dense


_TENSORS = (
    "AtenTensorHandle values, AtenTensorHandle lengths, AtenTensorHandle dense, "
    "AtenTensorHandle icfg, AtenTensorHandle fcfg, const AtenTensorHandle* tables, "
    "int64_t tables_len_, int32_t int8"
)
_LAYER = f"{_TENSORS}, AtenTensorHandle wg_t, AtenTensorHandle wg_sum, AtenTensorHandle b_eff, double eps"


def _c_shims() -> dict[Any, list[str]]:
    """The operators' C shims (deploy/cpp/rocketrec_ops.cpp, end): the compiled model calls
    them directly instead of through the proxy executor's boxed dispatch."""
    ops = torch.ops.rocketrec
    return {
        ops.light_features.default: [
            f"AOTITorchError aoti_torch_cpu_light_features({_TENSORS}, int64_t out_dim, "
            "AtenTensorHandle* ret0)"
        ],
        ops.light_first_layer.default: [
            f"AOTITorchError aoti_torch_cpu_light_first_layer({_LAYER}, AtenTensorHandle* ret0)"
        ],
        ops.light_first_layer_context.default: [
            f"AOTITorchError aoti_torch_cpu_light_first_layer_context({_LAYER}, "
            "AtenTensorHandle* ret0)"
        ],
    }


def _compile(module: nn.Module, method: str, inputs: tuple[torch.Tensor, ...]) -> Any:
    # score_candidates is compiled for a context and >= 2 candidates (the traced tower
    # specializes a single row); one candidate is scored as two (repeat_last_row)
    min_rows = 3 if method == CANDIDATES else 1
    entry = _Entry(module, method).eval()
    inputs = _trace_example(inputs)
    with torch.no_grad():
        ep = torch.export.export(entry, inputs, dynamic_shapes=_dynamic(inputs, min_rows, method))
        options: dict[str, Any] = dict(_COMPILE_OPTIONS)
        if _uses_ops(ep):
            options["aot_inductor.custom_ops_to_c_shims"] = _c_shims()
        return torch._inductor.aot_compile(ep.module(), inputs, options=options)


def _uses_ops(ep: Any) -> bool:
    """Whether the exported program calls a rocketrec operator (the portable module does not)."""
    return any(
        n.op == "call_function" and str(n.target).startswith("rocketrec.") for n in ep.graph.nodes
    )


def write_package(
    module: nn.Module,
    manifest: dict[str, Any],
    path: Path,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> float:
    """Compile `module`'s forward (and score_candidates, if it has one) with AOTInductor
    and write the package to `path`. `inputs` / `candidates`: example inputs of each entry
    point (their sizes are not baked in). Returns the compile time in seconds."""
    from torch.export.pt2_archive._package import PT2ArchiveWriter, _package_aoti_files
    from torch.export.pt2_archive._package_weights import Weights

    t0 = time.perf_counter()
    # inductor's progress and cache lines are not the user's business; errors still raise
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)
    compiled = {FORWARD: _compile(module, FORWARD, inputs)}
    if candidates is not None and hasattr(module, CANDIDATES):
        compiled[CANDIDATES] = _compile(module, CANDIDATES, candidates)
    files: dict[str, list[Any]] = {}
    constants: dict[str, dict[str, torch.Tensor]] = {}
    for name, out in compiled.items():
        files[name] = [f for f in out if not isinstance(f, Weights)]
        constants[name] = {k: t for w in out if isinstance(w, Weights) for k, (t, _) in w.items()}
    fd, tmp = tempfile.mkstemp(suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save(constants, tmp)  # one torch.save: storages shared by both entries once
        with PT2ArchiveWriter(str(path)) as archive:
            _package_aoti_files(archive, files)
            archive.write_file(CONSTANTS, tmp)
            archive.write_string(MANIFEST, json.dumps(manifest, indent=1))
    finally:
        os.unlink(tmp)
    return time.perf_counter() - t0


def _last_op_error() -> str:
    """This thread's last failed operator call through a C shim ('' if none)."""
    import ctypes

    try:  # the library is loaded with its symbols global (rocketrec.serving.ops)
        fn = ctypes.CDLL(None).rocketrec_ops_last_error
    except (OSError, AttributeError):
        return ""
    fn.restype = ctypes.c_char_p
    return (fn() or b"").decode("utf-8", "replace")


class AotiModel:
    """A loaded `.pt2`: `model(values, lengths, dense)` and `model.score_candidates(...)`,
    like the TorchScript module (`rocketrec.serving.ops.load_model` returns either)."""

    def __init__(self, path: str | Path, num_runners: int = 1) -> None:
        import io
        import zipfile

        from torch.export.pt2_archive._package import load_pt2

        try:
            contents = load_pt2(str(path), num_runners=num_runners)
        except RuntimeError as e:
            if "undefined symbol: aoti_torch_cpu_light" in str(e):  # the operators' C shims
                raise RuntimeError(
                    f"{path}: this package calls the rocketrec op library's C shims, which are "
                    "not loaded (rocketrec.serving.ops.load_library loads them; an older build "
                    "of the library lacks them: rebuild it)"
                ) from None
            raise
        self.path = str(path)
        self._runners = contents.aoti_runners
        if FORWARD not in self._runners:
            raise RuntimeError(f"{path}: no '{FORWARD}' model in the AOTInductor package")
        with zipfile.ZipFile(path) as z:
            (name,) = [n for n in z.namelist() if n.endswith("/" + CONSTANTS)]
            constants = torch.load(io.BytesIO(z.read(name)), weights_only=True)
        for entry, runner in self._runners.items():  # the same tensors for both entries
            runner.load_constants(constants[entry], check_full_update=True, user_managed=True)

    def __call__(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        return self.forward(values, lengths, dense)

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        return self._run(FORWARD, values, lengths, dense)

    def score_candidates(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        if CANDIDATES not in self._runners:
            raise RuntimeError(f"{self.path}: this package has no {CANDIDATES} entry point")
        if dense.shape[0] == 2:  # one candidate: compiled for >= 2 (see _compile)
            return self._run(CANDIDATES, *repeat_last_row(values, lengths, dense))[:1]
        return self._run(CANDIDATES, values, lengths, dense)

    def _run(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        try:
            out = self._runners[name](*inputs)
        except RuntimeError as e:  # a failed C shim call: the operator's own message
            why = _last_op_error()
            if why:
                raise RuntimeError(why) from e
            raise
        return out[0] if isinstance(out, list | tuple) else out  # type: ignore[no-any-return]

    def eval(self) -> AotiModel:  # module-like: nothing to switch
        return self


def repeat_last_row(
    values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same inputs with their last row once more (lengths and values input-major)."""
    rows = dense.shape[0]
    lens = lengths.view(-1, rows)
    segs = torch.split(values, lens.reshape(-1).tolist())
    out = []
    for i in range(lens.shape[0]):
        row = segs[i * rows : (i + 1) * rows]
        out += [*row, row[-1]]
    new_lengths = torch.cat([lens, lens[:, -1:]], 1).reshape(-1)
    return torch.cat(out) if out else values, new_lengths, torch.cat([dense, dense[-1:]])


def is_package(path: str | Path) -> bool:
    """Whether `path` is a PT2 archive (an AOTInductor package) rather than TorchScript."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def temp_beside(out: Path) -> Path:
    """A temporary path for `out` in a new hidden directory beside it (renamed onto `out`
    once checked; the archive takes its root name from the file's name)."""
    d = tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)
    return Path(d) / (out.stem + ".pt2")
