"""GPU check for a session lent the device: model, loss and loop on CUDA vs CPU.

    python benchmarks/gpu_check.py [--steps 200] [--batch-size 4096]

The device image has torch but no torchrec/fbgemm/pyarrow, so this uses only
torch and rocketrec's torch-only parts (rocketrec.model.towers, .loss): shared
unsharded nn.EmbeddingBag tables (the ads_ctr layout), the booster and light
towers, the rocket loss with gradient block, Adam + sparse Adagrad, on random
Zipf-like ids. It checks the gradient block on each device (the hint leaves
every booster gradient unchanged), that the loss falls, and prints examples/s
on CUDA against CPU in the same run. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rocketrec.model.loss import LossConfig, bce, rocket_loss  # noqa: E402
from rocketrec.model.towers import BoosterTower, LightTower, ModelConfig  # noqa: E402

TABLES = [200_000, 5_000, 100_000, 20_000, 5_000, 1_000, 10_000, 50_000, 20_000, 500]
FEATURE_TABLE = [0, 1, 6, 5, 7, 2, 3, 4, 5, 8, 9, 9]  # 12 features, one table shared
LIGHT = [0, 2, 5, 7, 8, 10]
DIM, DENSE = 16, 4


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(r, DIM, mode="sum", sparse=True) for r in TABLES)
        cfg = ModelConfig()
        self.booster = BoosterTower(len(FEATURE_TABLE) * DIM + DENSE, cfg)
        self.light = LightTower(len(LIGHT) * DIM + 2, cfg)

    def forward(self, ids: list[torch.Tensor], offsets: list[torch.Tensor], dense: torch.Tensor):
        pooled = [self.bags[t](ids[f], offsets[f]) for f, t in enumerate(FEATURE_TABLE)]
        z_b = self.booster(torch.cat(pooled + [dense], 1))
        z_l = self.light(torch.cat([pooled[f] for f in LIGHT] + [dense[:, :2]], 1))
        return z_b, z_l


def batch(b: int, device: torch.device, g: torch.Generator):
    ids, offsets = [], []
    for t in FEATURE_TABLE:
        lens = torch.randint(1, 4, (b,), generator=g)
        n = int(lens.sum())
        u = torch.rand(n, generator=g)
        raw = (TABLES[t] * u**3).long() % TABLES[t]  # skewed ids
        ids.append(raw.to(device))
        offsets.append((torch.cumsum(lens, 0) - lens).to(device))
    dense = torch.randn(b, DENSE, generator=g).to(device)
    logit = dense[:, 0] - 2.0 + 0.5 * (ids[0][offsets[0]] % 7 == 0).float()
    labels = (torch.rand(b, generator=g).to(device) < torch.sigmoid(logit)).float()
    return ids, offsets, dense, labels


def run(device: torch.device, steps: int, b: int) -> tuple[float, float, float, bool]:
    torch.manual_seed(0)
    m = Model().to(device)
    dense_params = list(m.booster.parameters()) + list(m.light.parameters())
    opt = torch.optim.Adam(dense_params, lr=1e-3)
    sopt = torch.optim.Adagrad(list(m.bags.parameters()), lr=0.05)
    cfg = LossConfig(hint="kd")
    g = torch.Generator().manual_seed(1)
    batches = [batch(b, device, g) for _ in range(8)]
    # gradient block: the full loss gives booster parameters exactly their own BCE gradient
    ids, offs, dense, y = batches[0]
    z_b, z_l = m(ids, offs, dense)
    total, _ = rocket_loss(z_b, z_l, y, None, cfg)
    gb = torch.autograd.grad(total, list(m.booster.parameters()), retain_graph=True)
    own = torch.autograd.grad(bce(z_b, y, None), list(m.booster.parameters()))
    block_ok = all(torch.equal(a, c) for a, c in zip(gb, own))
    losses = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        ids, offs, dense, y = batches[i % len(batches)]
        z_b, z_l = m(ids, offs, dense)
        loss, terms = rocket_loss(z_b, z_l, y, None, cfg)
        opt.zero_grad()
        sopt.zero_grad()
        loss.backward()
        opt.step()
        sopt.step()
        losses.append(terms["bce_booster"] + terms["bce_light"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    first = sum(losses[:10]) / 10
    last = sum(losses[-10:]) / 10
    return steps * b / dt, first, last, block_ok


PRE_SPEC = {
    "version": 1,
    "label": "y",
    "tables": [
        {"name": "u", "rows": 100_003, "dim": 16},
        {"name": "t", "rows": 1000, "dim": 16, "pooling": "mean"},
        {"name": "x", "rows": 50_000, "dim": 8},
        {"name": "b", "rows": 8, "dim": 8},
    ],
    "sparse": [
        {"name": "user", "column": "user", "table": "u"},
        {"name": "tags", "column": "tags", "kind": "list", "table": "t", "max_ids": 5},
        {"name": "ad", "column": "ad", "table": "u"},
        {
            "name": "band",
            "column": "price",
            "kind": "bucketize",
            "boundaries": [0.1, 1, 5, 20, 100],
            "table": "b",
        },
        {"name": "user_x_ad", "kind": "cross", "inputs": ["user", "ad"], "table": "x"},
        {
            "name": "tags_x_band",
            "kind": "cross",
            "inputs": ["tags", "band"],
            "table": "x",
            "max_ids": 4,
        },
    ],
    "dense": [
        {"name": "price", "column": "price", "transform": "log1p"},
        {
            "name": "age",
            "column": "age",
            "fill": 3.0,
            "transform": "standardize",
            "mean": 2.0,
            "std": 4.0,
        },
    ],
}


def check_preprocess(device: torch.device, b: int = 4096) -> bool:
    """rocketrec's preprocessing (max_ids, crosses, bucketizing, id mod rows, fill and
    transforms: the training model's first stage) on `device` equals the CPU's exactly."""
    from rocketrec.model.preprocess import Preprocess
    from rocketrec.spec import spec_from_dict

    spec = spec_from_dict(PRE_SPEC)
    g = torch.Generator().manual_seed(3)
    lens = torch.cat(
        [
            (torch.rand(b, generator=g) < 0.95).long(),  # user: some missing
            torch.randint(0, 9, (b,), generator=g),  # tags: 0..8 ids (capped at 5)
            torch.ones(b, dtype=torch.long),  # ad
        ]
    )
    values = torch.randint(-(2**62), 2**62, (int(lens.sum()),), generator=g)
    numeric = torch.rand(b, 2, generator=g) * 150 - 10
    numeric[torch.rand(b, 2, generator=g) < 0.1] = float("nan")
    numeric = numeric[:, [0, 1, 0]]  # price (dense), age, price (bucketized)
    pre = Preprocess(spec)
    want = pre(values, lens, numeric)
    got = pre.to(device)(values.to(device), lens.to(device), numeric.to(device))
    return all(torch.equal(w, g_.cpu()) for w, g_ in zip(want[:2], got[:2])) and bool(
        torch.allclose(want[2], got[2].cpu(), rtol=1e-6, atol=1e-6)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4096)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rates = {}
    ok = True
    for d in devices:
        steps = a.steps if d.type == "cuda" else max(20, a.steps // 10)
        rate, first, last, block_ok = run(d, steps, a.batch_size)
        rates[d.type] = rate
        fell = last < first
        ok &= block_ok and fell
        print(
            f"{d.type}: {rate:,.0f} ex/s over {steps} steps of {a.batch_size}; BCE {first:.4f} -> {last:.4f} "
            f"({'falls' if fell else 'DOES NOT FALL'}); gradient block {'exact' if block_ok else 'BROKEN'}"
        )
    for d in devices[1:]:
        pre_ok = check_preprocess(d)
        ok &= pre_ok
        print(f"preprocessing (crosses, bucketize, max_ids, mod rows) on {d.type} == cpu: {pre_ok}")
    if "cuda" in rates:
        print(
            f"CUDA / CPU examples/s: {rates['cuda'] / rates['cpu']:.1f}x ({torch.cuda.get_device_name()})"
        )
    else:
        print("no CUDA device here: CPU figures only")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
