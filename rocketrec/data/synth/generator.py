"""Rows of a spec: the true logit from the hidden world (`world.py`, `histories.py`),
labels drawn from it, columns written as the spec's types, the teacher column."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rocketrec.data.synth.histories import Histories
from rocketrec.data.synth.report import Truth
from rocketrec.data.synth.world import (
    DRIFT_SALT,
    HDIM,
    N_CAT,
    N_SEG,
    TEACHER_NULL,
    Feature,
    SynthConfig,
    rotate,
    side_rng,
    std,
)
from rocketrec.errors import ConfigError
from rocketrec.spec import FeatureSpec


@dataclass
class _Rows:
    """One draw of rows: the logit parts and what the columns are made of."""

    z: np.ndarray  # float32 true logit without the bias
    z_base: np.ndarray  # float32 the same without the sequence terms
    cols: dict[str, tuple[np.ndarray, np.ndarray | None]]
    dense: list[np.ndarray]
    side: np.random.Generator  # the second generator, after the sequences' draws
    match: dict[str, np.ndarray]  # each scored sequence's raw best match (NaN: empty)


class Generator:
    """Draws rows of a spec from one hidden ground truth (`cfg.world_seed`)."""

    def __init__(self, spec: FeatureSpec, cfg: SynthConfig) -> None:
        if cfg.rows < 1:
            raise ConfigError(f"rows must be >= 1, got {cfg.rows}")
        if cfg.files < 1:
            raise ConfigError(f"files must be >= 1, got {cfg.files}")
        if cfg.partitions < 0 or cfg.first_partition < 0:
            raise ConfigError("partitions and first_partition must be >= 0")
        if cfg.drift and not cfg.partitions:
            raise ConfigError("drift needs partitions (the click model moves per partition)")
        if not cfg.teacher_noise >= 0:
            raise ConfigError(f"teacher_noise must be >= 0, got {cfg.teacher_noise}")
        if cfg.true_ctr_column and cfg.true_ctr_column in spec.columns():
            raise ConfigError(
                f"true_ctr_column '{cfg.true_ctr_column}' collides with a spec column"
            )
        if cfg.true_ctr_column and cfg.true_ctr_column == spec.teacher_column:
            raise ConfigError(f"true_ctr_column '{cfg.true_ctr_column}' is the teacher column")
        self.spec, self.cfg = spec, cfg
        # sides alternate over the features drawn per row (sequences are drawn apart)
        sides, k = [], 0
        for f in spec.sparse:
            sides.append(k % 2)
            k += f.kind != "sequence"
        self.features = [
            Feature(spec.table(f.table).rows, f.name, side, cfg.world_seed)
            for f, side in zip(spec.sparse, sides)
        ]
        rng = np.random.default_rng([cfg.world_seed, 7])
        flat = [i for i, f in enumerate(spec.sparse) if f.kind != "sequence"]
        pairs = [(i, j) for a, i in enumerate(flat) for j in flat[a + 1 :]]
        pick: list[int] = rng.permutation(len(pairs))[: cfg.n_pairs].tolist() if pairs else []
        self.pairs = [pairs[k] for k in pick]
        self.cross = rng.standard_normal((N_SEG, N_CAT)).astype(np.float32)
        self.dense_mu = rng.normal(0, 0.7, size=(len(spec.dense), N_SEG)).astype(np.float32)
        self.dense_coef = rng.normal(0, 1, size=len(spec.dense)).astype(np.float32)
        self.list_lam = [2.0 + (i % 3) for i in range(len(self.features))]
        self.index = {f.name: i for i, f in enumerate(spec.sparse)}
        self.hist = Histories(spec, cfg, self.features, self.index)
        if self.hist.seqs:  # standardise each history's best match on a pilot sample
            self.hist.standardise(
                self._logit_parts(np.random.default_rng([cfg.world_seed, 98]), 20_000).match
            )
        # calibrate the bias on a pilot sample from its own stream
        pilot = self._logit_parts(np.random.default_rng([cfg.world_seed, 99]), 20_000).z
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

    def _logit_parts(self, rng: np.random.Generator, n: int) -> _Rows:
        """The rows' true logit (without the bias), its parts and the columns' contents."""
        seg = np.minimum(rng.zipf(1.3, n) - 1, N_SEG - 1)
        cat = rng.integers(0, N_CAT, n)
        latents = (seg, cat)
        first = np.zeros(n, np.float32)
        vecs = []
        cols: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for sf, hf, lam in zip(self.spec.sparse, self.features, self.list_lam):
            lat = latents[hf.side]
            if sf.kind in ("cross", "sequence"):  # no column / drawn by _histories
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
        for qb, qa in self.hist.derived_queries.items():  # the candidate's attribute of its item
            i, old = self.index[qb], cols[qb][0]
            new = self.hist.attr[(qa, qb)][cols[qa][0]]
            first += self.features[i].w[new] - self.features[i].w[old]
            vecs[i] = self.features[i].h[new]
            cols[qb] = (new, None)
        pair = np.zeros(n, np.float32)
        for i, j in self.pairs:
            pair += (vecs[i] * vecs[j]).sum(1)
        dense = []
        dense_term = np.zeros(n, np.float32)
        for k, _df in enumerate(self.spec.dense):
            logx = rng.normal(self.dense_mu[k, seg], 1.0).astype(np.float32)
            dense.append(np.exp(logx))
            dense_term += self.dense_coef[k] * logx
        z = 0.5 * std(first + 0.3 * dense_term) + 1.4 * std(pair) + 0.8 * std(self.cross[seg, cat])
        z = z.astype(np.float32)
        side = side_rng(rng)
        match = self.hist.draw(side, cols, cat) if self.hist.seqs else {}
        z_seq = self.hist.term(match, n)
        return _Rows(z + z_seq if self.hist.seqs else z, z, cols, dense, side, match)

    def at(self, theta: float) -> Generator:
        """This generator with its click model drifted: every plain feature's hidden
        weights and vectors, the segment x category crosses and the dense coefficients
        rotated `theta` radians towards a second, independent world (the ids, their
        popularity, the histories' terms and the bias stay)."""
        if theta == 0:
            return self
        g = copy.copy(self)
        other = self.cfg.world_seed ^ DRIFT_SALT
        g.features = []
        for f, sf in zip(self.features, self.spec.sparse):
            f2 = copy.copy(f)
            o = Feature(self.spec.table(sf.table).rows, f.name, f.side, other)
            f2.w, f2.h = rotate(f.w, o.w, theta), rotate(f.h, o.h, theta)
            g.features.append(f2)
        rng = np.random.default_rng([other, 7])
        g.cross = rotate(
            self.cross, rng.standard_normal(self.cross.shape).astype(np.float32), theta
        )
        g.dense_coef = rotate(
            self.dense_coef, rng.standard_normal(self.dense_coef.shape).astype(np.float32), theta
        )
        return g

    def table(self, rng: np.random.Generator, n: int) -> pa.Table:
        return self._draw(rng, n)[0]

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[pa.Table, Truth]:
        parts = self._logit_parts(rng, n)
        z, cols, dense = parts.z, parts.cols, parts.dense
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
            if sf.kind == "sequence":  # ids of the history's id space (e.g. the query's)
                hf = self.features[self.index[self.hist.seq_of[sf.name].owner]]
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
        truth = Truth(y, z + self.bias, parts.z_base + self.bias if self.hist.seqs else None)
        if self.spec.teacher_column:
            # a production model's score: the true logit plus N(0, s^2), 1% null
            noise = parts.side.standard_normal(n).astype(np.float32)
            gap = parts.side.random(n) < TEACHER_NULL
            tz = (z + self.bias) + np.float32(self.cfg.teacher_noise) * noise
            if self.spec.teacher_kind == "probability":
                with np.errstate(over="ignore"):
                    tp = 1 / (1 + np.exp(-tz))
                # strictly inside (0, 1) in float32 (clips only logits beyond about +-17/-87)
                lo, hi = np.finfo(np.float32).tiny, np.nextafter(np.float32(1), np.float32(0))
                score = np.clip(tp, lo, hi).astype(np.float32)
            else:
                score = tz.astype(np.float32)
            arrays[self.spec.teacher_column] = pa.array(score, mask=gap)
            truth.teacher, truth.teacher_ok = tz, ~gap
        return pa.table(arrays), truth


def _mask(values: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.nulls(len(values), values.type), values)
