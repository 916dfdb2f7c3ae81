"""Run by tests/test_dist.py: in a 2-rank gloo group, rank 0 alone exports RUN's newest
checkpoint (as the follow loop's publishing does) while rank 1 waits at a barrier: the
export's checkpoint reads must not be collectives. Args: RANK WORLD RUN OUT."""

import os
import sys

import torch.distributed as dist

rank, world, run, out = sys.argv[1:5]
os.environ.update(RANK=rank, WORLD_SIZE=world)
dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
if rank == "0":
    from rocketrec.serving.export import export_checkpoint

    export_checkpoint(run, out)
dist.barrier()
dist.destroy_process_group()
