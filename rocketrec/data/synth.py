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

Behaviour sequences (sparse `kind: sequence`): a list column, NEWEST FIRST (position 0
is the most recent item; a model keeps the first `max_len`, the newest). Lengths are
at most `max_len`.

- Interest space: 32 hidden unit "interest centres" in 12 d, 8 topics per interest.
  Every id of an item id space gets a hidden unit vector: its cluster's centre + its
  topic's offset + its own noise (cosine ~0.9 within a topic, ~0.7 across the topics
  of a cluster, ~0 across clusters); its cluster is its slice of the vocabulary
  (`rank // (vocab // 32)`), its topic a hidden draw. A sequence on its query's table
  (query of kind scalar or list) holds the query's ids (the same raw ids or strings:
  `hist_ads` holds `ad_id` values); any other sequence has ids (and vectors) of its
  own in the same space.
- Per row, the user has 1-4 interests (clusters) with Dirichlet weights; with
  probability 0.5 the first is the candidate's cluster (the candidate is from one of
  the user's interests), otherwise all are random. Interests are the row's state,
  not tied to the user id: only the history reveals them.
- The history: 5% empty, else a length uniform in [min(5, max_len), max_len]; each
  item picks an interest by its weight (10% stray items: a random cluster) and a
  popular (Zipf) id of that cluster. Positions carry no signal (the booster's
  attention has no positional encoding); newest first matters where lists are cut.
- True logit += `seq_weight` (2.0) x the standardised BEST MATCH between candidate
  and history: the max over history items of cos(v_candidate, v_item); an empty
  history scores the mean. Only the matching part of the history matters: mean
  pooling dilutes it by that interest's share of the history, attention can pick it
  out. Independent sequences split the weight (each gets seq_weight / sqrt(count)).
- Paired sequences: given an item sequence A (on the table of its scalar query QA,
  e.g. `hist_ads`, query ad_id), a later sequence B on another table whose scalar
  query QB reads B's table (e.g. `hist_categories`, query ad_category) is DERIVED
  from A: every item has one hidden attribute (its interest and topic's category),
  B lists the attributes of A's items (of its first, newest, B.max_len) and QB's
  column becomes the attribute of QA's id (the candidate's category is its ad's).
  A derived sequence adds no term of its own; any other sequence is drawn
  independently by the scheme above (all share the row's interests).
- A query that is not a scalar id feature (list, bucketize, cross) has no item
  vector: the candidate's interest is then the row's hidden ad category `cat`.
- Sequence (and teacher) randomness comes from a second generator seeded from the
  row generator's seed; sequences take no part in the pairwise term. Specs without
  sequences or a teacher give exactly the files they gave before; adding a sequence
  changes only the labels (and a derived query's column).

Teacher (`teacher: {column, kind}` in the spec): a logged production model's score,
written from the second generator: teacher logit = true logit + N(0, teacher_noise^2)
(0 = a perfect teacher), as a float32 probability in (0, 1) (kind probability) or
as the logit (kind logit); 1% of the scores are null (logging gaps).

`synth(..., report=SynthReport())` also measures, over the rows written, the Bayes
AUC (true probability vs the written labels), the Bayes AUC of the true logit
without the sequence terms, and the teacher's AUC on its non-null rows (binned in
logit space: exact to ~1e-5).

Deterministic for a seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rocketrec.spec import FeatureSpec, SparseFeature

N_SEG, N_CAT, HDIM = 64, 32, 8
MAX_VOCAB = 20_000
# behaviour sequences: the hidden interest space
N_INTEREST, IDIM = 32, 12  # interest centres, dims of the hidden unit vectors
N_TOPIC = 8  # topics per interest (a derived attribute, e.g. a category, is the topic's)
TOPIC_SPREAD, ITEM_SPREAD = 0.5, 0.35  # cos ~0.91 within a topic, ~0.73 across topics
MAX_INTERESTS = 4  # a user has 1..MAX_INTERESTS interests per row
P_IN = 0.5  # probability that the candidate's cluster is one of the user's interests
P_STRAY = 0.1  # history items from a random cluster
P_EMPTY = 0.05  # empty histories
MIN_LEN = 5  # shortest non-empty history (or max_len when smaller)
TEACHER_NULL = 0.01  # logging gaps in the teacher column
_SIDE_SALT = 0x5E9  # the second generator (sequences, teacher) of a row generator


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


class _Items:
    """Hidden interest vectors of one item id space (a query's ids and its histories')."""

    def __init__(self, vocab: int, name: str, seed: int, centres: np.ndarray) -> None:
        rng = np.random.default_rng([seed, _salt(name), _SIDE_SALT])
        k = len(centres)
        self.vocab = vocab
        self.chunk = max(1, vocab // k)
        self.cluster = np.minimum(np.arange(vocab) // self.chunk, k - 1)
        self.topic = rng.integers(0, N_TOPIC, vocab)
        topics = rng.standard_normal((k, N_TOPIC, IDIM)) / np.sqrt(IDIM)
        noise = rng.standard_normal((vocab, IDIM)) / np.sqrt(IDIM)
        u = (
            centres[self.cluster]
            + TOPIC_SPREAD * topics[self.cluster, self.topic]
            + ITEM_SPREAD * noise
        )
        self.u = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
        p = 1.0 / np.arange(1, self.chunk + 1)  # popularity inside a cluster
        self.cdf = np.cumsum(p / p.sum())

    def draw(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """A popular id of each cluster."""
        local = np.searchsorted(self.cdf, rng.random(len(clusters)), side="right")
        local = np.minimum(local, self.chunk - 1)
        return np.minimum(clusters * self.chunk + local, self.vocab - 1).astype(np.int64)


@dataclass(frozen=True)
class _Seq:
    """How one sequence feature is drawn: its id space (`owner`, a feature name), its
    query, and for a derived sequence the sequence it lists the attributes of."""

    feature: SparseFeature
    owner: str  # the feature whose ids (and hidden vectors) the history holds
    query: str
    derived_from: _Seq | None = None  # the item sequence A of a derived B = attr(A)


def _std(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / (s if s > 0 else 1.0)


def _side_rng(rng: np.random.Generator) -> np.random.Generator:
    """A second generator derived from `rng`'s seed (not its state): new columns draw
    from it, so the row generator's stream, and every column drawn from it, is the one
    a spec without sequences or a teacher gets."""
    ss = rng.bit_generator.seed_seq
    if isinstance(ss, np.random.SeedSequence):
        key = (*ss.spawn_key, _SIDE_SALT)
        return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=key))
    return np.random.default_rng(rng.integers(0, 2**63))  # an unseeded generator


def _bag_positions(lens: np.ndarray) -> np.ndarray:
    """Each element's position inside its bag (bags of `lens`, in order)."""
    starts = np.cumsum(lens) - lens
    return np.arange(int(lens.sum())) - np.repeat(starts, lens)


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
    def __init__(self, spec: FeatureSpec, cfg: SynthConfig) -> None:
        if cfg.rows < 1:
            raise ValueError(f"rows must be >= 1, got {cfg.rows}")
        if cfg.files < 1:
            raise ValueError(f"files must be >= 1, got {cfg.files}")
        if not cfg.teacher_noise >= 0:
            raise ValueError(f"teacher_noise must be >= 0, got {cfg.teacher_noise}")
        if cfg.true_ctr_column and cfg.true_ctr_column in spec.columns():
            raise ValueError(f"true_ctr_column '{cfg.true_ctr_column}' collides with a spec column")
        if cfg.true_ctr_column and cfg.true_ctr_column == spec.teacher_column:
            raise ValueError(f"true_ctr_column '{cfg.true_ctr_column}' is the teacher column")
        self.spec, self.cfg = spec, cfg
        # sides alternate over the features drawn per row (sequences are drawn apart)
        sides, k = [], 0
        for f in spec.sparse:
            sides.append(k % 2)
            k += f.kind != "sequence"
        self.features = [
            _Feature(spec.table(f.table).rows, f.name, side, cfg.world_seed)
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
        self._init_sequences()
        # calibrate the bias on a pilot sample from its own stream
        pilot = self._logit_parts(np.random.default_rng([cfg.world_seed, 99]), 20_000).z
        self.bias = self._solve_bias(pilot, cfg.ctr)

    # -- sequences -------------------------------------------------------------------
    def _init_sequences(self) -> None:
        spec, cfg = self.spec, self.cfg
        self.index = {f.name: i for i, f in enumerate(spec.sparse)}
        self.seqs: list[_Seq] = []
        self.items: dict[str, _Items] = {}
        self.attr: dict[tuple[str, str], np.ndarray] = {}  # (A owner, B owner) -> map
        self.derived_queries: dict[str, str] = {}  # QB -> QA: QB's id = attr(QA's id)
        self.seq_mean: dict[str, float] = {}
        self.seq_sd: dict[str, float] = {}
        self.seq_of: dict[str, _Seq] = {}
        if not spec.sequences:
            return
        crng = np.random.default_rng([cfg.world_seed, _SIDE_SALT])
        c = crng.standard_normal((N_INTEREST, IDIM))
        centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.centres = centres.astype(np.float32)
        by = {f.name: f for f in spec.sparse}
        items_seqs: list[_Seq] = []  # item sequences A (on their query's table)
        for f in spec.sequences:
            q = by[str(f.query)]
            # the query's ids when it reads ids of this table (a bucketize or cross query
            # has ids the model computes: the history then has ids of its own)
            same = f.table == q.table and q.kind in ("scalar", "list")
            owner = q.name if same else f.name
            s = _Seq(f, owner, q.name)
            derive = None
            if q.kind == "scalar" and same:
                for a in items_seqs:
                    qa = by[a.query]
                    if qa.kind == "scalar" and a.query != q.name and a.feature.table != f.table:
                        derive = a
                        break
            if derive is not None:
                s = _Seq(f, owner, q.name, derived_from=derive)
                self.derived_queries.setdefault(q.name, derive.query)
            elif same:
                items_seqs.append(s)
            self.seqs.append(s)
        spaces = {s.owner for s in self.seqs} | {s.query for s in self.seqs}
        for name in sorted(spaces, key=lambda x: self.index[x]):
            hf = self.features[self.index[name]]
            self.items[name] = _Items(hf.vocab, name, cfg.world_seed, centres)
        self.seq_of = {s.feature.name: s for s in self.seqs}
        for s in self.seqs:
            if s.derived_from is not None:
                self._attr(s.derived_from.owner, s.owner)
        for qb, qa_name in self.derived_queries.items():  # the candidate's attribute (QB of QA)
            self._attr(qa_name, qb)
        # standardise each scored sequence's best match on a pilot sample
        self.seq_mean = {s.feature.name: 0.0 for s in self.scored}
        self.seq_sd = {s.feature.name: 1.0 for s in self.scored}
        pilot = self._logit_parts(np.random.default_rng([cfg.world_seed, 98]), 20_000)
        for name, m in pilot.match.items():
            ok = m[~np.isnan(m)]
            if len(ok) > 1 and ok.std() > 0:
                self.seq_mean[name], self.seq_sd[name] = float(ok.mean()), float(ok.std())

    def _attr(self, a_name: str, b_name: str) -> np.ndarray:
        """Each id of space a's hidden attribute in space b (e.g. an ad's category): one
        id of b per (interest, topic) of a, in b's slice of that interest."""
        key = (a_name, b_name)
        if key not in self.attr:
            a, b = self.items_of(a_name), self.items_of(b_name)
            arng = np.random.default_rng([self.cfg.world_seed, _salt(a_name), _salt(b_name)])
            slot = np.stack(
                [arng.permutation(b.chunk)[np.arange(N_TOPIC) % b.chunk] for _ in range(N_INTEREST)]
            )  # (interest, topic) -> slot
            ranks = a.cluster * b.chunk + slot[a.cluster, a.topic]
            self.attr[key] = np.minimum(ranks, b.vocab - 1)
        return self.attr[key]

    def items_of(self, name: str) -> _Items:
        return self.items[name]

    @property
    def scored(self) -> list[_Seq]:
        """Sequences whose best match enters the true logit (the derived ones do not)."""
        return [s for s in self.seqs if s.derived_from is None]

    def _candidate(
        self, s: _Seq, cols: dict[str, tuple[np.ndarray, np.ndarray | None]], cat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cluster, hidden unit vector) of each row's candidate for sequence s."""
        q = self.spec.sparse[self.index[s.query]]
        if q.kind == "scalar" and q.name in cols:
            it = self.items_of(s.query)
            ranks = cols[q.name][0]
            return it.cluster[ranks], it.u[ranks]
        cl = cat % N_INTEREST  # no item: the row's hidden ad category's interest
        return cl, self.centres[cl]

    def _histories(
        self,
        side: np.random.Generator,
        cols: dict[str, tuple[np.ndarray, np.ndarray | None]],
        cat: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Draw every sequence into `cols`; returns each scored sequence's best match
        (NaN for an empty history)."""
        n = len(cat)
        scored = self.scored
        cand = {s.feature.name: self._candidate(s, cols, cat) for s in scored}
        # the user's interests: 1..4 clusters with Dirichlet weights; with probability
        # P_IN the first is the (first scored sequence's) candidate's cluster
        k = side.integers(1, MAX_INTERESTS + 1, n)
        interests = side.integers(0, N_INTEREST, (n, MAX_INTERESTS))
        hit = side.random(n) < P_IN
        interests[hit, 0] = cand[scored[0].feature.name][0][hit]
        w = side.gamma(1.0, size=(n, MAX_INTERESTS)) * (np.arange(MAX_INTERESTS) < k[:, None])
        cumw = np.cumsum(w / w.sum(1, keepdims=True), 1)
        match: dict[str, np.ndarray] = {}
        drawn: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in self.seqs:
            f, name = s.feature, s.feature.name
            cap = int(f.max_ids or 1)
            if s.derived_from is not None:
                ranks_a, lens_a = drawn[s.derived_from.feature.name]
                keep = _bag_positions(lens_a) < cap  # the newest cap items
                ranks = self.attr[(s.derived_from.owner, s.owner)][ranks_a[keep]]
                lens = np.minimum(lens_a, cap)
            else:
                lens = side.integers(min(MIN_LEN, cap), cap + 1, n)
                lens[side.random(n) < P_EMPTY] = 0
                rows = np.repeat(np.arange(n), lens)
                pick = (side.random(len(rows))[:, None] > cumw[rows]).sum(1)
                pick = np.minimum(pick, k[rows] - 1)
                clusters = interests[rows, pick]
                stray = side.random(len(rows)) < P_STRAY
                clusters[stray] = side.integers(0, N_INTEREST, int(stray.sum()))
                it = self.items_of(s.owner)
                ranks = it.draw(side, clusters)
                cos = np.einsum("ij,ij->i", it.u[ranks], cand[name][1][rows])
                m = np.full(n, np.nan, np.float32)
                full = lens > 0
                if full.any():
                    starts = (np.cumsum(lens) - lens)[full]
                    m[full] = np.maximum.reduceat(cos, starts)
                match[name] = m
            drawn[name] = (ranks, lens)
            cols[name] = (ranks, lens)
        return match

    # -- rows --------------------------------------------------------------------------
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
        for qb, qa in self.derived_queries.items():  # the candidate's attribute of its item
            i, old = self.index[qb], cols[qb][0]
            new = self.attr[(qa, qb)][cols[qa][0]]
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
        z = (
            0.5 * _std(first + 0.3 * dense_term)
            + 1.4 * _std(pair)
            + 0.8 * _std(self.cross[seg, cat])
        )
        z = z.astype(np.float32)
        side = _side_rng(rng)
        z_seq = np.zeros(n, np.float32)
        match = self._histories(side, cols, cat) if self.seqs else {}
        for name, m in match.items():  # an empty history (NaN) scores the mean
            t = np.nan_to_num((m - self.seq_mean[name]) / self.seq_sd[name], nan=0.0)
            z_seq += (self.cfg.seq_weight / np.sqrt(len(match)) * t).astype(np.float32)
        return _Rows(z + z_seq if self.seqs else z, z, cols, dense, side, match)

    def table(self, rng: np.random.Generator, n: int) -> pa.Table:
        return self._draw(rng, n)[0]

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[pa.Table, _Truth]:
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
                hf = self.features[self.index[self.seq_of[sf.name].owner]]
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
        truth = _Truth(y, z + self.bias, parts.z_base + self.bias if self.seqs else None)
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


@dataclass
class _Truth:
    """What a drawn table hides: labels and logits (for the report)."""

    y: np.ndarray
    logit: np.ndarray  # true logit (with the bias)
    logit_no_seq: np.ndarray | None  # the same without the sequence terms
    teacher: np.ndarray | None = None  # the teacher's logit
    teacher_ok: np.ndarray | None = None  # rows whose teacher score is not null


class _BinnedAuc:
    """Streaming ROC AUC: positives and negatives counted in fine logit bins (ties within
    a bin count a half); exact to ~1e-5 for logits in [-30, 30]."""

    LO, HI, BINS = -30.0, 30.0, 1 << 17

    def __init__(self) -> None:
        self.pos = np.zeros(self.BINS, np.int64)
        self.neg = np.zeros(self.BINS, np.int64)

    def add(self, y: np.ndarray, logit: np.ndarray) -> None:
        x = (np.asarray(logit, np.float64) - self.LO) * (self.BINS / (self.HI - self.LO))
        b = np.clip(x, 0, self.BINS - 1).astype(np.int64)
        pos = y.astype(bool)
        self.pos += np.bincount(b[pos], minlength=self.BINS)
        self.neg += np.bincount(b[~pos], minlength=self.BINS)

    def value(self) -> float:
        p, n = int(self.pos.sum()), int(self.neg.sum())
        if p == 0 or n == 0:
            return float("nan")
        below = np.cumsum(self.neg) - self.neg
        return float((self.pos * (below + 0.5 * self.neg)).sum() / (p * n))


@dataclass
class SynthReport:
    """Filled by `synth(..., report=...)`: AUCs over the rows written."""

    bayes: _BinnedAuc = field(default_factory=_BinnedAuc)
    bayes_no_seq: _BinnedAuc | None = None
    teacher: _BinnedAuc | None = None
    teacher_column: str | None = None
    teacher_noise: float = 0.0
    rows: int = 0
    teacher_rows: int = 0

    def add(self, t: _Truth) -> None:
        self.rows += len(t.y)
        self.bayes.add(t.y, t.logit)
        if t.logit_no_seq is not None:
            if self.bayes_no_seq is None:
                self.bayes_no_seq = _BinnedAuc()
            self.bayes_no_seq.add(t.y, t.logit_no_seq)
        if t.teacher is not None and t.teacher_ok is not None:
            if self.teacher is None:
                self.teacher = _BinnedAuc()
            self.teacher.add(t.y[t.teacher_ok], t.teacher[t.teacher_ok])
            self.teacher_rows += int(t.teacher_ok.sum())

    def lines(self) -> list[str]:
        out = [f"bayes auc: {self.bayes.value():.4f} (true probability vs the labels written)"]
        if self.bayes_no_seq is not None:
            out.append(
                f"bayes auc without the sequence term: {self.bayes_no_seq.value():.4f} "
                "(what a model that ignores the histories can reach at best)"
            )
        if self.teacher is not None:
            out.append(
                f"teacher auc: {self.teacher.value():.4f} (column '{self.teacher_column}', "
                f"noise {self.teacher_noise:g}, on its {self.teacher_rows:,} non-null rows)"
            )
        return out


def _mask(values: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.nulls(len(values), values.type), values)


def synth(
    spec: FeatureSpec,
    out_dir: str,
    cfg: SynthConfig,
    progress: bool = False,
    report: SynthReport | None = None,
) -> list[str]:
    """Write cfg.rows rows as cfg.files Parquet files under out_dir; returns the paths.
    `report`, if given, is filled with the AUCs of what was written."""
    os.makedirs(out_dir, exist_ok=True)
    gen = Generator(spec, cfg)
    if report is not None:
        report.teacher_column, report.teacher_noise = spec.teacher_column, cfg.teacher_noise
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
            t, truth = gen._draw(np.random.default_rng([cfg.seed, i, start]), max(n, 1))
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            if n > 0:
                writer.write_table(t, row_group_size=chunk)
                done += n
                if report is not None:
                    report.add(truth)
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
