"""Run by tests/test_scale.py in 2 gloo processes: a row-wise table born sharded.

Every aten op of setup, training, checkpoint and resume runs under a dispatch
mode that records the largest tensor any op produced; with the big table
row-wise over 2 ranks, no op may produce a tensor as large as the full table.
Also records the local parameter, optimizer-state and peak-RSS figures.
Writes a JSON report per rank.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MaxTensor(TorchDispatchMode):
    """Largest numel of any tensor an op returns while active (and the op that made it)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel, self.max_op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                n = t.numel()
                if n > self.max_numel:
                    self.max_numel, self.max_op = n, str(func)
        return out


def main() -> None:
    rank, spec_path, data, out, report = sys.argv[1:6]
    rank_i = int(rank)
    os.environ.update(RANK=rank, WORLD_SIZE="2", LOCAL_RANK=rank)
    from rocketrec.model.towers import ModelConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import run
    from rocketrec.train.train_config import TrainConfig
    from rocketrec.train.trainer import Trainer

    spec = load_spec(spec_path)
    cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
    tc = TrainConfig(
        batch_size=256,
        max_steps=0 if sys.argv[6] == "init" else int(sys.argv[6]),
        checkpoint_every=3,
        log_every=0,
        seed=3,
        sharding={"big": {"sharding_type": "row_wise"}},
    )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    probe = MaxTensor()
    with probe:
        t = Trainer(spec, cfg, ModelLossDefaults(), tc, out, data)
        if len(sys.argv) > 7:  # resume an existing run
            from rocketrec.checkpoint.files import latest_checkpoint

            t.resume(latest_checkpoint(out))
        local = {}
        for k, v in t.dmp.state_dict().items():
            if hasattr(v, "local_shards"):
                local[k] = sum(s.tensor.numel() for s in v.local_shards())
        opt = 0
        for st in t.dmp.fused_optimizer.state_dict()["state"].values():
            for v in st.values():
                if hasattr(v, "local_shards"):
                    opt = max(opt, max((s.tensor.numel() for s in v.local_shards()), default=0))
        if sys.argv[6] == "init":
            t.save()  # the initial state, untrained
        else:
            run(t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(report, "w") as f:
        json.dump(
            {
                "rank": rank_i,
                "max_op_numel": probe.max_numel,
                "max_op": probe.max_op,
                "local_table_numel": local,
                "max_optimizer_state_numel": opt,
                "rss_start": rss0,
                "rss_peak": peak,
            },
            f,
        )
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def ModelLossDefaults():  # noqa: N802 - a tiny factory kept beside its only use
    from rocketrec.model.loss import LossConfig

    return LossConfig(hint="kd")


if __name__ == "__main__":
    main()
