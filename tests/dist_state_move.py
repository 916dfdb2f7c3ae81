"""Run by tests/test_dist.py: resume run RUN's newest checkpoint on RANK of WORLD gloo
ranks without training, and save it again into OUT2 (so that the test can compare the
two checkpoints' tables and optimizer state). Args: RANK WORLD SPEC DATA RUN OUT2."""

import os
import sys

from rocketrec.checkpoint.files import latest_checkpoint
from rocketrec.model.loss import LossConfig
from rocketrec.model.towers import ModelConfig
from rocketrec.spec import load_spec
from rocketrec.train.train_config import TrainConfig
from rocketrec.train.trainer import Trainer

rank, world, spec_path, data, run, out2 = sys.argv[1:7]
os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
tc = TrainConfig(batch_size=256, max_steps=6, checkpoint_every=3, log_every=0, seed=5)
ck = latest_checkpoint(run)
t = Trainer(load_spec(spec_path), cfg, LossConfig(), tc, out2, data, resume_from=ck)
t.resume(ck)
t.save()
t.env.close()
