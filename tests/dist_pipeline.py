"""Run by tests/test_dist.py: RANK of WORLD gloo ranks train 12 steps on the step path
STEP_PATH (pipeline or plain), logging every step and evaluating every 5.
Args: RANK WORLD SPEC DATA OUT STEP_PATH."""

import os
import sys

from rocketrec.model.towers import ModelConfig
from rocketrec.spec import load_spec
from rocketrec.train.loop import train
from rocketrec.train.train_config import TrainConfig

rank, world, spec_path, data, out, path = sys.argv[1:7]
os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
tc = TrainConfig(
    batch_size=128,
    max_steps=12,
    log_every=1,
    eval_every=5,
    eval_batches=2,
    seed=4,
    step_path=path,
    sharding={"t_user": {"sharding_type": "row_wise"}, "t_ad": {"sharding_type": "table_wise"}},
)
train(load_spec(spec_path), data, data, out, cfg, None, tc)
