"""Run by tests/test_dist.py in 2 gloo processes: sharded vs unsharded, same data.

Each rank trains its own local batches with the DMP-sharded model; the reference
(an unsharded model in one process) trains on both ranks' batches with the
same optimizers. TorchRec divides the tables' gradients by the world size
(its default gradient division, measured here: with SGD the sharded update is
exactly half of a per-rank-loss sum's) and DDP averages the dense ones, so the
reference sums the per-rank losses and divides every
gradient by the world size. Rank 0 writes losses and final tables to a file.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    sharding, spec_path, data, out = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
    sparse_opt = sys.argv[7] if len(sys.argv) > 7 else "rowwise_adagrad"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from rocketrec.data.reader import ParquetReader
    from rocketrec.model.init import init_tables
    from rocketrec.model.loss import LossConfig, rocket_loss
    from rocketrec.model.model import RocketModel
    from rocketrec.model.towers import ModelConfig
    from rocketrec.parallel.dist import init_distributed
    from rocketrec.parallel.sharding import shard_model
    from rocketrec.spec import load_spec

    spec = load_spec(spec_path)
    cfg = ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))
    loss_cfg = LossConfig(hint="kd")
    steps, lr_dense, lr_sparse = int(os.environ.get("DC_STEPS", "4")), 1e-2, 0.1

    torch.manual_seed(0)
    ref = RocketModel(spec, cfg, table_seed=7)  # unsharded: full tables, per-row init
    torch.manual_seed(0)
    model = RocketModel(spec, cfg, table_device=torch.device("meta"))  # born sharded
    env = init_distributed()
    constraints = {t.name: {"sharding_type": sharding} for t in spec.tables}
    dmp = shard_model(model, env, sparse_opt, lr_sparse, constraints)
    init_tables(dmp.state_dict(), 7)
    init_diff = _max_table_diff(dmp, ref, rank)
    dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    opt = torch.optim.Adam(dense_params, lr=lr_dense)

    ref_tables = [p for m in (ref.ebc, ref.ec) if m is not None for p in m.parameters()]
    ref_tables_ids = {id(p) for p in ref_tables}
    ref_dense = [p for p in ref.parameters() if id(p) not in ref_tables_ids]
    if sharding == "data_parallel":  # DP tables are trained by the dense optimizer
        ref_opt = torch.optim.Adam(list(ref.parameters()), lr=lr_dense)
        ref_sparse = None
    else:
        ref_opt = torch.optim.Adam(ref_dense, lr=lr_dense)
        ref_sparse = (
            RowWiseAdagrad(ref_tables, lr=lr_sparse, eps=1e-8)
            if sparse_opt == "rowwise_adagrad"
            else torch.optim.SGD(ref_tables, lr=lr_sparse)
        )

    readers = [
        ParquetReader(data, spec, 128, rank=r, world_size=world, shuffle=False)
        for r in range(world)
    ]
    its = [iter(r) for r in readers]
    losses, ref_losses = [], []
    for _ in range(steps):
        batches = [next(it) for it in its]
        b = batches[rank]
        o = dmp(b.dense, b.sparse)
        loss, _ = rocket_loss(o.booster, o.light, b.labels, b.weights, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / world)
        # reference: sum of per-rank mean losses; dense grads averaged like DDP
        ref_opt.zero_grad()
        if ref_sparse:
            ref_sparse.zero_grad()
        total = 0.0
        for bb in batches:
            ro = ref(bb.dense, bb.sparse)
            rl, _ = rocket_loss(ro.booster, ro.light, bb.labels, bb.weights, loss_cfg)
            total = total + rl
        total.backward()
        for p in ref.parameters():  # the mean over ranks, tables included
            if p.grad is not None:
                p.grad /= world
        ref_opt.step()
        if ref_sparse:
            ref_sparse.step()
        ref_losses.append(float(total) / world)

    result = {"losses": losses, "ref_losses": ref_losses, "init_table_diff": init_diff}
    result.update(_compare(dmp, ref, rank))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _compare(dmp, ref, rank: int) -> dict[str, float]:
    """Gather every table to rank 0 (test-sized tables only) and compare with `ref`."""
    res = {"max_table_diff": 0.0, "max_dense_diff": 0.0, "table_entries": 0, "table_off": 0}
    ref_sd = ref.state_dict()
    for key, val in dmp.state_dict().items():
        if hasattr(val, "local_shards"):
            full_t = torch.zeros(val.size()) if rank == 0 else None
            val.gather(dst=0, out=full_t)
            if rank == 0:
                diff = (full_t - ref_sd[key]).abs()
                res["max_table_diff"] = max(res["max_table_diff"], float(diff.max()))
                res["table_entries"] += diff.numel()
                res["table_off"] += int((diff > 1e-3).sum())
        elif rank == 0 and key in ref_sd:
            d = float((val.detach().float() - ref_sd[key].float()).abs().max())
            key_kind = "max_table_diff" if key.startswith(("ebc.", "ec.")) else "max_dense_diff"
            if d > res[key_kind]:
                res[key_kind + "_key"] = key  # type: ignore[assignment]
            res[key_kind] = max(res[key_kind], d)
    return res


def _max_table_diff(dmp, ref, rank: int) -> float:
    return _compare(dmp, ref, rank)["max_table_diff"]


if __name__ == "__main__":
    main()
