"""The training step makes no host sync of its own: `aten::_local_scalar_dense` (what
`.item()`, `float(t)` and `bool(t)` of a tensor dispatch) is counted under a dispatch
mode during every step of the pipelined path, and each call is attributed by its
Python stack. The step's own code (train task, loss, dense optimizer, clipping,
divergence guard) must make none; logging steps read the loss terms outside the step.
What remains is listed, not hidden: TorchRec/fbgemm's CPU kernels and the preprocessing's
data-dependent output sizes (crosses, max_ids), which run a batch ahead in the
pipeline's data-distribution stage."""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import small_model


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_origin: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_origin[_origin(traceback.extract_stack())] += 1
        return func(*args, **(kwargs or {}))


def _origin(stack) -> str:  # type: ignore[no-untyped-def]
    """'library' when the innermost project frame is TorchRec's or fbgemm's, else the
    rocketrec module it comes from."""
    for f in reversed(stack):
        name = f.filename.replace("\\", "/")
        if "/torchrec/" in name or "/fbgemm_gpu/" in name:
            return "library"
        if "/rocketrec/" in name and not name.endswith("tests/test_host_sync.py"):
            return name.split("/rocketrec/", 1)[1]
    return "torch"  # e.g. an optimizer's step called from the loop


def test_pipelined_step_makes_no_host_sync(tmp_path, tiny_spec, tiny_data, monkeypatch):
    import rocketrec.train.epoch as loop  # where the epoch looks up make_steps
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    per_step: list[Counter[str]] = []
    real = loop.make_steps

    def counted(*a, **k):  # type: ignore[no-untyped-def]
        steps = real(*a, **k)
        inner = steps.progress

        def progress(data):  # type: ignore[no-untyped-def]
            mode = _Syncs()
            with mode:
                out = inner(data)
            per_step.append(mode.by_origin)
            return out

        steps.progress = progress
        return steps

    monkeypatch.setattr(loop, "make_steps", counted)
    tc = TrainConfig(batch_size=128, max_steps=8, log_every=4, seed=1, step_path="pipeline")
    train(tiny_spec, tiny_data["train"], None, str(tmp_path / "run"), small_model(), None, tc)
    steady = per_step[2:8]  # after the pipeline's fill and TorchRec's one-time input checks
    assert len(steady) == 6
    own = [
        {o: n for o, n in c.items() if o not in ("library", "model/preprocess.py")} for c in steady
    ]
    assert own == [{}] * 6, own  # the step's own code: none
    # the test sees syncs where they exist: the preprocessing's output sizes are counted
    assert sum(c["model/preprocess.py"] for c in steady) >= 5, steady
