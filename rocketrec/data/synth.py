"""Synthetic ad logs for any feature spec, with a hidden ground truth that has interactions.

Design (what makes the data useful for comparing a deep and a shallow tower):

- Two latent row variables, a user segment `seg` (64 values) and an ad
  category `cat` (32 values). Sparse features alternate between the user side
  (ids clustered by `seg`) and the ad side (clustered by `cat`): with
  probability `cluster_p` an id is drawn from its latent value's slice of the
  vocabulary, otherwise from the whole vocabulary. Ids are Zipf-skewed, so ids
  correlate with each other through the latents (ad -> campaign -> category,
  user -> segment), and visible features can proxy hidden ones.
- Every (feature, id) has a hidden weight and an 8-d hidden vector. The true
  logit is  b + 0.5 * first-order + 1.4 * sum of <H_f, H_g> over random feature
  pairs + 0.8 * A[seg, cat]  (each term standardised), with `b` set for the
  target click rate. A shallow model sees the first-order part; crosses need
  depth. List features pool their elements' weights and vectors (mean).
- Dense features are log-normal with a mean that depends on the latents.
- Some nulls (2% of scalar ids, 5% of dense values), some empty lists.
- `true_ctr_column`: optionally write the true click probability (for Bayes
  ceilings and perfect-teacher baselines); it is never a feature.
- `seed` draws the rows; `world_seed` fixes the hidden model, so train and
  validation sets drawn with different seeds share one ground truth.
- `label_noise`: flip this fraction of labels (after drawing them).

Deterministic for a seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketrec.spec import FeatureSpec

N_SEG, N_CAT, HDIM = 64, 32, 8
MAX_VOCAB = 20_000


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


def _salt(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Feature:
    """Hidden parameters of one sparse feature's id space."""

    def __init__(self, spec_rows: int, name: str, side: int, seed: int) -> None:
        rng = np.random.default_rng([seed, _salt(name)])
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
        self.salt = _salt(name)
        self._strings: pa.Array | None = None

    def draw(self, rng: np.random.Generator, latent: np.ndarray, cluster_p: float) -> np.ndarray:
        n = len(latent)
        glob = np.searchsorted(self.cdf, rng.random(n), side="right")
        local = np.searchsorted(self.cdf_chunk, rng.random(n), side="right")
        clustered = (latent * self.chunk + local) % self.vocab
        use = rng.random(n) < cluster_p
        return np.minimum(np.where(use, clustered, glob), self.vocab - 1).astype(np.int64)

    def raw_ids(self, ranks: np.ndarray) -> np.ndarray:
        mixed = _splitmix64(ranks.astype(np.uint64) + np.uint64(self.salt) * np.uint64(1 << 32))
        return (mixed >> np.uint64(1)).astype(np.int64)  # non-negative int64

    def strings(self) -> pa.Array:
        if self._strings is None:
            self._strings = pa.array([f"{self.name}:{r:x}" for r in range(self.vocab)], pa.string())
        return self._strings


def _std(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / (s if s > 0 else 1.0)


class Generator:
    def __init__(self, spec: FeatureSpec, cfg: SynthConfig) -> None:
        if cfg.rows < 1:
            raise ValueError(f"rows must be >= 1, got {cfg.rows}")
        if cfg.files < 1:
            raise ValueError(f"files must be >= 1, got {cfg.files}")
        if cfg.true_ctr_column and cfg.true_ctr_column in spec.columns():
            raise ValueError(f"true_ctr_column '{cfg.true_ctr_column}' collides with a spec column")
        self.spec, self.cfg = spec, cfg
        self.features = [
            _Feature(spec.table(f.table).rows, f.name, i % 2, cfg.world_seed)
            for i, f in enumerate(spec.sparse)
        ]
        rng = np.random.default_rng([cfg.world_seed, 7])
        nf = len(self.features)
        pairs = [(i, j) for i in range(nf) for j in range(i + 1, nf)]
        pick: list[int] = rng.permutation(len(pairs))[: cfg.n_pairs].tolist() if pairs else []
        self.pairs = [pairs[k] for k in pick]
        self.cross = rng.standard_normal((N_SEG, N_CAT)).astype(np.float32)
        self.dense_mu = rng.normal(0, 0.7, size=(len(spec.dense), N_SEG)).astype(np.float32)
        self.dense_coef = rng.normal(0, 1, size=len(spec.dense)).astype(np.float32)
        self.list_lam = [2.0 + (i % 3) for i in range(nf)]
        # calibrate the bias on a pilot sample from its own stream
        pilot = self._logit_parts(np.random.default_rng([cfg.world_seed, 99]), 20_000)[0]
        self.bias = self._solve_bias(pilot, cfg.ctr)

    @staticmethod
    def _solve_bias(z: np.ndarray, ctr: float) -> float:
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(z + mid)))).mean() > ctr:
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    def _logit_parts(self, rng: np.random.Generator, n: int):
        seg = np.minimum(rng.zipf(1.3, n) - 1, N_SEG - 1)
        cat = rng.integers(0, N_CAT, n)
        latents = (seg, cat)
        first = np.zeros(n, np.float32)
        vecs = []
        cols: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for sf, hf, lam in zip(self.spec.sparse, self.features, self.list_lam):
            lat = latents[hf.side]
            if sf.kind == "cross":  # computed by the model from its inputs: no column
                vecs.append(np.zeros((n, HDIM), np.float32))
                continue
            if sf.kind == "bucketize":  # a number spread over the buckets, by latent
                b = np.asarray(sf.boundaries, dtype=np.float64)
                nb = len(b) + 1
                kb = (lat * 7 + rng.integers(0, 3, n)) % nb  # bucket 0 = below b[0]
                step0 = b[1] - b[0] if len(b) > 1 else max(abs(b[0]), 1.0)
                step1 = b[-1] - b[-2] if len(b) > 1 else max(abs(b[-1]), 1.0)
                edges = np.concatenate([[b[0] - step0], b, [b[-1] + step1]])
                x = edges[kb] + (edges[kb + 1] - edges[kb]) * rng.random(n)
                bucket = kb + 1
                first += hf.w[bucket]
                vecs.append(hf.h[bucket])
                cols[sf.name] = (x, None)
                continue
            if sf.kind == "list":
                lens = 1 + rng.poisson(lam, n)
                lens[rng.random(n) < 0.05] = 0  # some empty lists
                ranks = hf.draw(rng, np.repeat(lat, lens), self.cfg.cluster_p)
                rows = np.repeat(np.arange(n), lens)
                cnt = np.maximum(lens, 1).astype(np.float32)
                w = np.bincount(rows, hf.w[ranks], minlength=n).astype(np.float32) / cnt
                h = np.zeros((n, HDIM), np.float32)
                np.add.at(h, rows, hf.h[ranks])
                h /= cnt[:, None]
                cols[sf.name] = (ranks, lens)
            else:
                ranks = hf.draw(rng, lat, self.cfg.cluster_p)
                w, h = hf.w[ranks], hf.h[ranks]
                cols[sf.name] = (ranks, None)
            first += w
            vecs.append(h)
        pair = np.zeros(n, np.float32)
        for i, j in self.pairs:
            pair += (vecs[i] * vecs[j]).sum(1)
        dense = []
        dense_term = np.zeros(n, np.float32)
        for k, _df in enumerate(self.spec.dense):
            logx = rng.normal(self.dense_mu[k, seg], 1.0).astype(np.float32)
            dense.append(np.exp(logx))
            dense_term += self.dense_coef[k] * logx
        z = (
            0.5 * _std(first + 0.3 * dense_term)
            + 1.4 * _std(pair)
            + 0.8 * _std(self.cross[seg, cat])
        )
        return z.astype(np.float32), cols, dense

    def table(self, rng: np.random.Generator, n: int) -> pa.Table:
        z, cols, dense = self._logit_parts(rng, n)
        p = 1 / (1 + np.exp(-(z + self.bias)))
        y = (rng.random(n) < p).astype(np.int8)
        if self.cfg.label_noise > 0:
            flip = rng.random(n) < self.cfg.label_noise
            y[flip] = 1 - y[flip]
        arrays: dict[str, pa.Array] = {self.spec.label_column: pa.array(y, pa.int8())}
        if self.spec.weight_column:
            arrays[self.spec.weight_column] = pa.array(rng.uniform(0.5, 1.5, n).astype(np.float32))
        for sf, hf in zip(self.spec.sparse, self.features):
            if sf.kind == "cross" or sf.column in arrays:
                continue
            ranks, lens = cols[sf.name]
            if sf.kind == "bucketize":
                arrays[sf.column] = pa.array(ranks, mask=rng.random(n) < 0.05)
                continue
            if sf.dtype == "string":
                values: pa.Array = pa.DictionaryArray.from_arrays(
                    pa.array(ranks.astype(np.int32)), hf.strings()
                ).cast(pa.string())
            else:
                values = pa.array(hf.raw_ids(ranks), pa.int64())
            if lens is None:
                arr = _mask(values, rng.random(n) < 0.02)
            else:
                offsets = np.zeros(n + 1, np.int32)
                np.cumsum(lens, out=offsets[1:])
                arr = pa.ListArray.from_arrays(pa.array(offsets), values)
            arrays[sf.column] = arr
        for df, x in zip(self.spec.dense, dense):
            if df.column not in arrays:
                arrays[df.column] = pa.array(x, mask=rng.random(n) < 0.05)
        if self.spec.group_column and self.spec.group_column not in arrays:
            # a group column that is no feature (e.g. a request id): Zipf-like group ids
            arrays[self.spec.group_column] = pa.array(
                np.minimum(rng.zipf(1.3, n), 5000).astype(np.int64)
            )
        if self.cfg.true_ctr_column:
            arrays[self.cfg.true_ctr_column] = pa.array(p.astype(np.float32))
        return pa.table(arrays)


def _mask(values: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.nulls(len(values), values.type), values)


def synth(spec: FeatureSpec, out_dir: str, cfg: SynthConfig, progress: bool = False) -> list[str]:
    """Write cfg.rows rows as cfg.files Parquet files under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    gen = Generator(spec, cfg)
    paths = []
    per_file = [
        cfg.rows // cfg.files + (1 if i < cfg.rows % cfg.files else 0) for i in range(cfg.files)
    ]
    chunk = max(cfg.row_group_size, 1)
    done = 0
    for i, nrows in enumerate(per_file):
        path = os.path.join(out_dir, f"part-{i:05d}.parquet")
        tmp = os.path.join(out_dir, f".part-{i:05d}.parquet.tmp")  # hidden: readers skip it
        writer: pq.ParquetWriter | None = None
        for start in range(0, max(nrows, 1), chunk):
            n = min(chunk, nrows - start)
            t = gen.table(np.random.default_rng([cfg.seed, i, start]), max(n, 1))
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            if n > 0:
                writer.write_table(t, row_group_size=chunk)
                done += n
            if progress:
                print(f"synth: {done:,}/{cfg.rows:,} rows", flush=True)
        assert writer is not None
        writer.close()
        os.replace(tmp, path)
        paths.append(path)
    return paths


def heldout_table(spec: FeatureSpec, data: str | list[str] | None, rows: int) -> pa.Table:
    """Rows to check an export on: the first `rows` of `data`'s first row group, or
    synthetic rows of the spec when no data is given."""
    if data:
        from rocketrec.data.files import list_parquet_files

        fs, files = list_parquet_files(data)
        pf = pq.ParquetFile(fs.open_input_file(files[0]))
        return pf.read_row_group(0, columns=spec.columns()).slice(0, rows)
    gen = Generator(spec, SynthConfig(rows=rows, seed=12345))
    return gen.table(np.random.default_rng(12345), rows)
