"""Run by tests/test_dist.py: W workers x (1024 / W) rows on the same global batches.

Rank r trains on batches r, r + W, r + 2W, ... of a 1-rank reader of 256 / W rows,
so that with W = 1 (batch 256) and W = 2 (2 x 128) every step sees the same rows.
"""

import os
import sys

rank, world, spec_path, data, out, steps = sys.argv[1:7]
rank_i, world_i, steps_i = int(rank), int(world), int(steps)
os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world)

from rocketrec.data.reader import ParquetReader  # noqa: E402
from rocketrec.model.loss import LossConfig  # noqa: E402
from rocketrec.model.towers import ModelConfig  # noqa: E402
from rocketrec.spec import load_spec  # noqa: E402
from rocketrec.train.loop import train  # noqa: E402
from rocketrec.train.train_config import TrainConfig  # noqa: E402

B = 256 // world_i


class EveryWth(ParquetReader):
    def __iter__(self):
        for k, b in enumerate(super().__iter__()):
            if k % world_i == rank_i:
                yield b

    def min_batches_all_ranks(self, epoch=0):
        return steps_i

    def rows_for(self, epoch, rank=None):
        return steps_i * B


spec = load_spec(spec_path)
assert spec.weight_column, "the parity check needs sample weights"
cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
tc = TrainConfig(batch_size=B, max_steps=steps_i, log_every=0, seed=2, step_path="plain")
train(spec, EveryWth(data, spec, B, 0, 1, shuffle=False), None, out, cfg, LossConfig(), tc)
