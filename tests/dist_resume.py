"""Run by tests/test_dist.py: train 2 gloo ranks for a few steps with checkpoints."""

import os
import sys

from rocketrec.model.model import ModelConfig
from rocketrec.spec import load_spec
from rocketrec.train.loop import TrainConfig, train

rank, spec_path, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
tc = TrainConfig(batch_size=256, max_steps=6, checkpoint_every=3, log_every=0, seed=5)
train(load_spec(spec_path), data, None, out, cfg, None, tc)
