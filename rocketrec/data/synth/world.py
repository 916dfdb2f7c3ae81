"""The hidden ground truth of a spec's plain features (see `rocketrec.data.synth`): id
spaces clustered by two row latents, each id's hidden weight and vector."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

N_SEG, N_CAT, HDIM = 64, 32, 8
MAX_VOCAB = 20_000
TEACHER_NULL = 0.01  # logging gaps in the teacher column
SIDE_SALT = 0x5E9  # the second generator (sequences, teacher) of a row generator


@dataclass(frozen=True)
class SynthConfig:
    rows: int
    seed: int = 0  # sampling: which rows are drawn
    world_seed: int = 0  # the hidden ground truth; train and validation share it
    files: int = 1
    row_group_size: int = 65_536
    ctr: float = 0.05
    cluster_p: float = 0.7
    label_noise: float = 0.0
    true_ctr_column: str | None = None
    n_pairs: int = 24
    teacher_noise: float = 1.0  # sd of the teacher's logit noise (0: a perfect teacher)
    seq_weight: float = 2.0  # weight of the (standardised) best-match sequence term
    # near-line logs: 0 = files directly under the output directory; N = N partition
    # directories (`hour=0000/` ...), each with `files` files and a `_SUCCESS` marker
    partitions: int = 0
    first_partition: int = 0  # the index of the first one written (write them one by one)
    # the click model drifts: at partition k the hidden weights are rotated k * drift
    # radians from this world towards a second, independent one (0: a fixed world)
    drift: float = 0.0


def salt(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Feature:
    """Hidden parameters of one sparse feature's id space."""

    def __init__(self, spec_rows: int, name: str, side: int, seed: int) -> None:
        rng = np.random.default_rng([seed, salt(name)])
        self.name = name
        self.side = side  # 0: user side (seg), 1: ad side (cat)
        self.vocab = int(max(3, min(MAX_VOCAB, spec_rows * 3 // 2)))
        self.n_latent = N_SEG if side == 0 else N_CAT
        self.chunk = max(1, self.vocab // self.n_latent)
        p = 1.0 / np.arange(1, self.vocab + 1) ** 1.2
        self.cdf = np.cumsum(p / p.sum())
        pc = 1.0 / np.arange(1, self.chunk + 1) ** 1.2
        self.cdf_chunk = np.cumsum(pc / pc.sum())
        self.w = rng.standard_normal(self.vocab).astype(np.float32)
        self.h = rng.standard_normal((self.vocab, HDIM)).astype(np.float32)
        # part of an id's meaning comes from its latent cluster (so ids proxy latents)
        lat_h = rng.standard_normal((self.n_latent, HDIM)).astype(np.float32)
        owner = np.minimum(np.arange(self.vocab) // self.chunk, self.n_latent - 1)
        self.h = (0.6 * self.h + 0.8 * lat_h[owner]).astype(np.float32)
        self.salt = salt(name)
        self._strings: pa.Array | None = None

    def draw(self, rng: np.random.Generator, latent: np.ndarray, cluster_p: float) -> np.ndarray:
        n = len(latent)
        glob = np.searchsorted(self.cdf, rng.random(n), side="right")
        local = np.searchsorted(self.cdf_chunk, rng.random(n), side="right")
        clustered = (latent * self.chunk + local) % self.vocab
        use = rng.random(n) < cluster_p
        return np.minimum(np.where(use, clustered, glob), self.vocab - 1).astype(np.int64)

    def raw_ids(self, ranks: np.ndarray) -> np.ndarray:
        mixed = splitmix64(ranks.astype(np.uint64) + np.uint64(self.salt) * np.uint64(1 << 32))
        return (mixed >> np.uint64(1)).astype(np.int64)  # non-negative int64

    def strings(self) -> pa.Array:
        if self._strings is None:
            self._strings = pa.array([f"{self.name}:{r:x}" for r in range(self.vocab)], pa.string())
        return self._strings


DRIFT_SALT = 0xD21F7  # the second world the click model drifts towards


def rotate(a: np.ndarray, b: np.ndarray, theta: float) -> np.ndarray:
    """cos(theta) a + sin(theta) b: for independent a, b of one variance, the same
    variance at every angle, and corr(a, result) = cos(theta)."""
    return (np.cos(theta) * a + np.sin(theta) * b).astype(a.dtype)


def std(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / (s if s > 0 else 1.0)


def side_rng(rng: np.random.Generator) -> np.random.Generator:
    """A second generator derived from `rng`'s seed (not its state): new columns draw
    from it, so the row generator's stream, and every column drawn from it, is the one
    a spec without sequences or a teacher gets."""
    ss = rng.bit_generator.seed_seq
    if isinstance(ss, np.random.SeedSequence):
        key = (*ss.spawn_key, SIDE_SALT)
        return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=key))
    return np.random.default_rng(rng.integers(0, 2**63))  # an unseeded generator
