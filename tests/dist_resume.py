"""Run by tests/test_dist.py: train RANK of WORLD gloo ranks for a few steps with
checkpoints, or resume a run (any world size). Args: RANK WORLD SPEC DATA OUT STEPS
[SHARDING as table=kind,...] [RESUME]."""

import os
import sys

from rocketrec.model.towers import ModelConfig
from rocketrec.spec import load_spec
from rocketrec.train.loop import train
from rocketrec.train.train_config import TrainConfig

rank, world, spec_path, data, out = sys.argv[1:6]
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 6
sharding = {}
if len(sys.argv) > 7 and sys.argv[7]:
    for item in sys.argv[7].split(","):
        t, k = item.split("=")
        sharding[t] = {"sharding_type": k}
resume = sys.argv[8] if len(sys.argv) > 8 else None
os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
tc = TrainConfig(
    batch_size=256, max_steps=steps, checkpoint_every=3, log_every=0, seed=5, sharding=sharding
)
train(load_spec(spec_path), data, None, out, cfg, None, tc, resume=resume)
