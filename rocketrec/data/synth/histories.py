"""Behaviour sequences (sparse `kind: sequence`): a list column, NEWEST FIRST (position 0
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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rocketrec.data.synth.world import SIDE_SALT, Feature, SynthConfig, salt
from rocketrec.spec import FeatureSpec, SparseFeature

# the hidden interest space
N_INTEREST, IDIM = 32, 12  # interest centres, dims of the hidden unit vectors
N_TOPIC = 8  # topics per interest (a derived attribute, e.g. a category, is the topic's)
TOPIC_SPREAD, ITEM_SPREAD = 0.5, 0.35  # cos ~0.91 within a topic, ~0.73 across topics
MAX_INTERESTS = 4  # a user has 1..MAX_INTERESTS interests per row
P_IN = 0.5  # probability that the candidate's cluster is one of the user's interests
P_STRAY = 0.1  # history items from a random cluster
P_EMPTY = 0.05  # empty histories
MIN_LEN = 5  # shortest non-empty history (or max_len when smaller)


class _Items:
    """Hidden interest vectors of one item id space (a query's ids and its histories')."""

    def __init__(self, vocab: int, name: str, seed: int, centres: np.ndarray) -> None:
        rng = np.random.default_rng([seed, salt(name), SIDE_SALT])
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


def _bag_positions(lens: np.ndarray) -> np.ndarray:
    """Each element's position inside its bag (bags of `lens`, in order)."""
    starts = np.cumsum(lens) - lens
    return np.arange(int(lens.sum())) - np.repeat(starts, lens)


Cols = dict[str, tuple[np.ndarray, np.ndarray | None]]  # feature -> (ranks, lengths or None)


class Histories:
    """The hidden interest world of a spec's sequences: which id space each history
    holds, the items' hidden vectors, derived attributes, and the rows' histories."""

    def __init__(
        self, spec: FeatureSpec, cfg: SynthConfig, features: list[Feature], index: dict[str, int]
    ) -> None:
        self.spec, self.cfg, self.index = spec, cfg, index
        self.seqs: list[_Seq] = []
        self.items: dict[str, _Items] = {}
        self.attr: dict[tuple[str, str], np.ndarray] = {}  # (A owner, B owner) -> map
        self.derived_queries: dict[str, str] = {}  # QB -> QA: QB's id = attr(QA's id)
        self.seq_mean: dict[str, float] = {}
        self.seq_sd: dict[str, float] = {}
        self.seq_of: dict[str, _Seq] = {}
        if not spec.sequences:
            return
        crng = np.random.default_rng([cfg.world_seed, SIDE_SALT])
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
        for name in sorted(spaces, key=lambda x: index[x]):
            self.items[name] = _Items(features[index[name]].vocab, name, cfg.world_seed, centres)
        self.seq_of = {s.feature.name: s for s in self.seqs}
        for s in self.seqs:
            if s.derived_from is not None:
                self._attr(s.derived_from.owner, s.owner)
        for qb, qa_name in self.derived_queries.items():  # the candidate's attribute (QB of QA)
            self._attr(qa_name, qb)
        self.seq_mean = {s.feature.name: 0.0 for s in self.scored}
        self.seq_sd = {s.feature.name: 1.0 for s in self.scored}

    def standardise(self, match: dict[str, np.ndarray]) -> None:
        """Standardise each scored sequence's best match by a pilot sample's."""
        for name, m in match.items():
            ok = m[~np.isnan(m)]
            if len(ok) > 1 and ok.std() > 0:
                self.seq_mean[name], self.seq_sd[name] = float(ok.mean()), float(ok.std())

    def term(self, match: dict[str, np.ndarray], n: int) -> np.ndarray:
        """The sequences' part of the true logit (an empty history, NaN, scores the mean)."""
        z_seq = np.zeros(n, np.float32)
        for name, m in match.items():
            t = np.nan_to_num((m - self.seq_mean[name]) / self.seq_sd[name], nan=0.0)
            z_seq += (self.cfg.seq_weight / np.sqrt(len(match)) * t).astype(np.float32)
        return z_seq

    def _attr(self, a_name: str, b_name: str) -> np.ndarray:
        """Each id of space a's hidden attribute in space b (e.g. an ad's category): one
        id of b per (interest, topic) of a, in b's slice of that interest."""
        key = (a_name, b_name)
        if key not in self.attr:
            a, b = self.items_of(a_name), self.items_of(b_name)
            arng = np.random.default_rng([self.cfg.world_seed, salt(a_name), salt(b_name)])
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

    def _candidate(self, s: _Seq, cols: Cols, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster, hidden unit vector) of each row's candidate for sequence s."""
        q = self.spec.sparse[self.index[s.query]]
        if q.kind == "scalar" and q.name in cols:
            it = self.items_of(s.query)
            ranks = cols[q.name][0]
            return it.cluster[ranks], it.u[ranks]
        cl = cat % N_INTEREST  # no item: the row's hidden ad category's interest
        return cl, self.centres[cl]

    def draw(
        self,
        side: np.random.Generator,
        cols: Cols,
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
