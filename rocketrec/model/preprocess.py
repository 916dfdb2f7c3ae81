"""Preprocessing, written once: raw inputs -> the model's features.

The training model (`RocketModel.forward`) and the exported serving module
(`rocketrec.serving.module.LightServing`) both run this module, so training and
serving agree by construction. It is plain torch and scriptable (TorchScript).

Raw inputs, for B rows:

    values   int64 [N]       raw ids of every id input's bags, feature-major (string ids
                             hashed with FNV-1a 64 first, rocketrec.spec.hashing)
    lengths  int64 [I * B]   bag sizes, feature-major, in `id_inputs` order
    numeric  float32 [B, C]  raw numbers in `numeric_inputs` order: the dense features,
                             then the bucketized ones; NaN = missing

Outputs:

    rows     int64 [M]       table rows of the sparse features, in `sparse_outputs` order
    lengths  int64 [F * B]   feature-major
    dense    float32 [B, D]  the dense features after fill and transform

Per sparse feature, in this order: `max_ids` truncation of id inputs (the first ids
are kept); bucketizing (id 0 = missing, else 1 + the number of boundaries <= x, in
float32); crosses (every combination of one id from each input's bag, in bag order,
first input outermost, hashed with `rocketrec.spec.hashing.cross_hash`, then `max_ids`);
finally `row = id mod rows` (non-negative). Dense: NaN -> fill, then the transform.

`sparse_outputs` order: id features, then crosses, then bucketized features (each
group in spec order). Consumers read features by name, never by position.
"""

from collections.abc import Sequence

import torch
from torch import nn

from rocketrec.spec import DenseFeature, FeatureSpec

# The hash constants of rocketrec.spec.hashing as int64 literals (TorchScript needs literals in
# the code; tests check them): FNV offset -3750763034362895579, FNV prime 1099511628211,
# fmix64's C1 -49064778989728563 and C2 -4265267296055464877; (h >> 33) & 2147483647 is
# the logical shift of an int64. Plain torch and the standard library only: the GPU check
# runs this module on a machine with torch alone.


def _shr33(h: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_and(torch.bitwise_right_shift(h, 33), 2147483647)


def fmix64(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer on int64 tensors (wrapping arithmetic)."""
    h = torch.bitwise_xor(h, _shr33(h)) * -49064778989728563
    h = torch.bitwise_xor(h, _shr33(h)) * -4265267296055464877
    return torch.bitwise_xor(h, _shr33(h))


def bag_positions(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each value's position inside its bag (bags of `lengths`, in order)."""
    n = values.numel()
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(n, device=values.device) - torch.repeat_interleave(
        starts, lengths, output_size=n
    )


def truncate_bags(
    values: torch.Tensor, lengths: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first `cap` ids of each bag (lengths [B])."""
    return values[bag_positions(values, lengths) < cap], torch.clamp_max(lengths, cap)


def cross_bags(
    h: torch.Tensor, hl: torch.Tensor, x: torch.Tensor, xl: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cross step: every (h_i, x_j) pair of each row, h outermost -> (h ^ x) * prime."""
    n = hl * xl
    b = n.numel()
    total = int(n.sum())
    r = torch.repeat_interleave(torch.arange(b, device=h.device), n, output_size=total)
    out_start = torch.cumsum(n, 0) - n
    p = torch.arange(total, device=h.device) - out_start[r]
    xlr = xl[r]
    i = torch.div(p, xlr, rounding_mode="floor")
    j = p - i * xlr
    h_start = torch.cumsum(hl, 0) - hl
    x_start = torch.cumsum(xl, 0) - xl
    out = torch.bitwise_xor(h[h_start[r] + i], x[x_start[r] + j]) * 1099511628211
    return out, n


class Preprocess(nn.Module):
    """Raw inputs -> (rows, lengths, dense); see the module docstring."""

    __jit_ignored_attributes__ = [
        "id_inputs",
        "numeric_inputs",
        "sparse_outputs",
        "dense_outputs",
    ]

    num_ids: int
    num_buckets: int
    num_dense: int
    num_out: int
    twins: bool
    has_offsets: bool
    out_offset: torch.Tensor
    lookup_index: torch.Tensor
    any_cap: bool
    select_ids: bool
    any_log1p: bool
    any_clip: bool
    any_standardize: bool
    cross_src: list[list[int]]
    source_scalar: list[bool]
    cross_cap: list[int]
    bucket_bounds: list[int]
    bucket_out: list[int]
    id_cap: torch.Tensor
    id_index: torch.Tensor
    id_is_out: torch.Tensor
    id_out_index: torch.Tensor
    out_rows: torch.Tensor
    boundaries: torch.Tensor
    fill: torch.Tensor
    is_log1p: torch.Tensor
    clip_lo: torch.Tensor
    clip_hi: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, spec: FeatureSpec, outputs: Sequence[str] | None = None) -> None:
        """outputs: the feature names (sparse and dense) to produce; default: all."""
        super().__init__()
        names = [f.name for f in spec.sparse] + [f.name for f in spec.dense]
        want = set(names if outputs is None else outputs)
        unknown = want - set(names)
        if unknown:
            raise ValueError(f"unknown feature(s) {sorted(unknown)}")
        sparse_out = [f for f in spec.sparse if f.name in want]
        crosses = [f for f in sparse_out if f.kind == "cross"]
        needed = {f.name for f in sparse_out} | {x for c in crosses for x in c.inputs or ()}
        ids = [f for f in spec.id_features if f.name in needed]
        buckets = [f for f in spec.bucket_features if f.name in needed]
        dense = [f for f in spec.dense if f.name in want]
        id_out = [f for f in ids if f.name in want]
        bucket_out = [f for f in buckets if f.name in want]
        self.id_inputs = ids  # the raw id inputs, in spec order
        self.numeric_inputs = [f.name for f in dense] + [f.name for f in buckets]
        outs = id_out + crosses + bucket_out
        self.sparse_outputs = [f.name for f in outs]
        self.dense_outputs = [f.name for f in dense]
        self.num_ids, self.num_buckets, self.num_dense = len(ids), len(buckets), len(dense)
        self.num_out = len(outs)

        # a scalar feature keeps at most one id per row (as a Parquet scalar column has)
        caps = [1 if f.kind == "scalar" else f.max_ids or 0 for f in ids]
        self.any_cap = any(c > 0 for c in caps)
        self._buffer(
            "id_cap", torch.tensor([c if c > 0 else 1 << 62 for c in caps], dtype=torch.int64)
        )
        self._buffer("id_index", torch.arange(len(ids), dtype=torch.int64))
        self.select_ids = len(id_out) != len(ids)
        self._buffer("id_is_out", torch.tensor([f.name in want for f in ids], dtype=torch.bool))
        self._buffer(
            "id_out_index",
            torch.tensor([i for i, f in enumerate(ids) if f.name in want], dtype=torch.int64),
        )
        source = {f.name: i for i, f in enumerate(ids)}
        source.update({f.name: len(ids) + k for k, f in enumerate(buckets)})
        self.cross_src = [[source[x] for x in c.inputs or ()] for c in crosses]
        # at most one id per row: scalar id inputs (capped at 1) and bucket ids
        self.source_scalar = [f.kind == "scalar" for f in ids] + [True] * len(buckets)
        self.cross_cap = [c.max_ids or 0 for c in crosses]
        bounds: list[float] = []
        self.bucket_bounds = [0]
        for f in buckets:
            bounds += list(f.boundaries or ())
            self.bucket_bounds.append(len(bounds))
        self._buffer("boundaries", torch.tensor(bounds, dtype=torch.float32))
        self.bucket_out = [buckets.index(f) for f in bucket_out]
        self._buffer(
            "out_rows", torch.tensor([spec.table(f.table).rows for f in outs], dtype=torch.int64)
        )
        self._buffer("out_offset", torch.zeros(len(outs), dtype=torch.int64))
        self._buffer("lookup_index", torch.arange(len(outs), dtype=torch.int64))
        self.twins = False
        self.has_offsets = False

        self._dense_buffers(dense)

    def _dense_buffers(self, dense: list[DenseFeature]) -> None:
        """Fill values and transforms of the dense outputs, as [1, D] rows."""

        def col(vals: list[float]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.float32).reshape(1, len(vals))

        inf = float("inf")
        self.any_log1p = any(f.transform == "log1p" for f in dense)
        self.any_clip = any(f.transform == "clip" for f in dense)
        self.any_standardize = any(f.transform == "standardize" for f in dense)
        self._buffer("fill", col([f.fill for f in dense]))
        self._buffer("is_log1p", col([f.transform == "log1p" for f in dense]).bool())
        clip = [f.transform == "clip" for f in dense]
        self._buffer(
            "clip_lo",
            col([f.min if c and f.min is not None else -inf for f, c in zip(dense, clip)]),
        )
        self._buffer(
            "clip_hi", col([f.max if c and f.max is not None else inf for f, c in zip(dense, clip)])
        )
        std = [f.transform == "standardize" for f in dense]
        self._buffer(
            "scale", col([1.0 / f.std if s and f.std else 1.0 for f, s in zip(dense, std)])
        )
        self._buffer(
            "shift",
            col([-f.mean / f.std if s and f.std and f.mean else 0.0 for f, s in zip(dense, std)]),
        )

    def _buffer(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t, persistent=False)  # derived from the spec: never saved

    # -- stages ---------------------------------------------------------------------
    def id_bags(
        self, values: torch.Tensor, lengths: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw id inputs -> (values, lengths [I, B]) after `max_ids` truncation."""
        lens2 = lengths.view(self.num_ids, b)
        if self.any_cap and bool((lens2 > self.id_cap.view(-1, 1)).any()):
            pos = bag_positions(values, lengths)
            feat = torch.repeat_interleave(self.id_index, lens2.sum(1), output_size=values.numel())
            values = values[pos < self.id_cap[feat]]
            lens2 = torch.minimum(lens2, self.id_cap.view(-1, 1))
        return values, lens2

    def bucket_ids(self, numeric: torch.Tensor) -> torch.Tensor:
        """Bucket ids [Kb, B] of the bucketized inputs (0 = NaN / missing)."""
        out: list[torch.Tensor] = []
        for k in range(self.num_buckets):
            x = numeric[:, self.num_dense + k].contiguous()
            bounds = self.boundaries[self.bucket_bounds[k] : self.bucket_bounds[k + 1]]
            ids = torch.bucketize(x, bounds, right=True) + 1
            out.append(ids.masked_fill_(torch.isnan(x), 0))
        if len(out) == 0:
            return torch.zeros(0, numeric.size(0), dtype=torch.int64, device=numeric.device)
        return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)

    def process_dense(self, numeric: torch.Tensor) -> torch.Tensor:
        """Raw dense columns (NaN = missing) -> fill, then the transform."""
        x = numeric.narrow(1, 0, self.num_dense)
        if self.num_dense == 0:
            return x
        x = torch.where(torch.isnan(x), self.fill, x)
        if self.any_log1p:
            x = torch.where(self.is_log1p, torch.log1p(torch.clamp_min(x, 0.0)), x)
        if self.any_clip:
            x = torch.clamp(x, self.clip_lo, self.clip_hi)
        if self.any_standardize:  # (x - mean) / std as x * (1 / std) + (-mean / std)
            x = torch.addcmul(self.shift, x, self.scale)
        return x

    def cross(
        self,
        c: int,
        sources_v: list[torch.Tensor],
        sources_l: list[torch.Tensor],
        scalar: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross c from its inputs' bags (sources_*: one entry per source index). scalar:
        every input has exactly one id per row (then the cross is elementwise)."""
        src = self.cross_src[c]
        h = torch.bitwise_xor(sources_v[src[0]], -3750763034362895579) * 1099511628211
        hl = sources_l[src[0]]
        for s in src[1:]:
            if scalar:
                h = torch.bitwise_xor(h, sources_v[s]) * 1099511628211
            else:
                h, hl = cross_bags(h, hl, sources_v[s], sources_l[s])
        h = fmix64(h)
        cap = self.cross_cap[c]
        if cap > 0 and not scalar and bool((hl > cap).any()):
            h, hl = truncate_bags(h, hl, cap)
        return h, hl

    def one_per_row(self, c: int, totals: list[int], b: int) -> bool:
        """Every input of cross c has exactly one id in each of the b rows (a scalar
        input keeps at most one, so `b` ids in all means one per row)."""
        for s in self.cross_src[c]:
            if not (self.source_scalar[s] and totals[s] == b):
                return False
        return True

    def sources(
        self, values: torch.Tensor, lens2: torch.Tensor, bids: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """Per source (id inputs, then bucketized inputs): (values, lengths [B]) and the
        number of ids (a bucketized input has one per row)."""
        b = lens2.size(1)
        totals: list[int] = lens2.sum(1).tolist()
        segs = torch.split(values, totals)
        sv: list[torch.Tensor] = []
        sl: list[torch.Tensor] = []
        for i in range(self.num_ids):
            sv.append(segs[i])
            sl.append(lens2[i])
        if self.num_buckets > 0:
            ones = torch.ones(b, dtype=torch.int64, device=values.device)
            for k in range(self.num_buckets):
                sv.append(bids[k])
                sl.append(ones)
                totals.append(b)
        return sv, sl, totals

    def finish(self, parts_v: list[torch.Tensor], parts_l: list[torch.Tensor], b: int):
        """Concatenate the output features' ids; row = id mod rows (+ the lookup offset)."""
        values = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v)
        lengths = parts_l[0] if len(parts_l) == 1 else torch.cat(parts_l)
        if self.twins:  # every feature looked up once more (the serving module's twins)
            values = torch.cat([values, values])
            lengths = torch.cat([lengths, lengths])
        n = values.numel()
        feat = torch.repeat_interleave(self.lookup_index, lengths.view(-1, b).sum(1), output_size=n)
        rows = torch.remainder(values, self.out_rows.index_select(0, feat))
        if self.has_offsets:
            rows = rows + self.out_offset.index_select(0, feat)
        return rows, lengths

    def configure_lookup(self, offsets: list[int], twins: bool = False) -> None:
        """Serving: add a row offset per output feature (fused tables), and with `twins`
        output every sparse feature twice (the second time with offsets[F + i])."""
        rows = self.out_rows.tolist()
        if twins:
            rows = rows + rows
        if len(offsets) != len(rows):
            raise ValueError(f"{len(rows)} offsets needed, got {len(offsets)}")
        self.twins = twins
        self.has_offsets = any(o != 0 for o in offsets)
        self._buffer("out_rows", torch.tensor(rows, dtype=torch.int64))
        self._buffer("out_offset", torch.tensor(offsets, dtype=torch.int64))
        self._buffer("lookup_index", torch.arange(len(rows), dtype=torch.int64))

    def id_outputs(
        self, vals: torch.Tensor, lens2: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The id features that are outputs: ([values], [lengths [F_id * B]])."""
        if self.select_ids:
            feat = torch.repeat_interleave(self.id_index, lens2.sum(1), output_size=vals.numel())
            return [vals[self.id_is_out[feat]]], [
                lens2.index_select(0, self.id_out_index).reshape(-1)
            ]
        if self.num_ids > 0:
            return [vals], [lens2.reshape(-1)]
        return [], []

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, numeric: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [N], lengths [I*B], numeric [B, C]) -> (rows, lengths [F*B], dense [B, D])."""
        b = numeric.size(0)
        vals, lens2 = self.id_bags(values, lengths, b)
        parts_v, parts_l = self.id_outputs(vals, lens2)
        if self.num_buckets > 0 or len(self.cross_src) > 0:
            bids = self.bucket_ids(numeric)
            if len(self.cross_src) > 0:
                sv, sl, totals = self.sources(vals, lens2, bids)
                for c in range(len(self.cross_src)):
                    cv, cl = self.cross(c, sv, sl, self.one_per_row(c, totals, b))
                    parts_v.append(cv)
                    parts_l.append(cl)
            for k in self.bucket_out:
                parts_v.append(bids[k])
                parts_l.append(torch.ones_like(bids[k]))
        rows, out_lengths = self.finish(parts_v, parts_l, b)
        return rows, out_lengths, self.process_dense(numeric)

    @torch.jit.export
    def forward_context(
        self, values: torch.Tensor, lengths: torch.Tensor, numeric: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row 0 = one context, rows 1..M = candidates -> features such that every output
        feature is given by exactly one side: the context's in row 0 (or an empty bag / a
        0 dense value), the candidates' in rows 1..M. Adding row 0's embeddings and dense
        values to each candidate row's gives the merged rows' (module docstring of
        rocketrec.serving.module). An input is the context's when the context gives it (a
        non-empty bag, a non-NaN number), else the candidates'. Crosses are computed per
        candidate from the merged inputs."""
        b = numeric.size(0)
        m = b - 1
        vals, lens2 = self.id_bags(values, lengths, b)
        ctx_has = ~torch.isnan(numeric[0:1])  # [1, C]: the context gives this number
        parts_v, parts_l = self.id_outputs(vals, lens2)
        if self.num_buckets > 0 or len(self.cross_src) > 0:
            bids = self.bucket_ids(numeric)  # [Kb, b]
            given: list[bool] = ctx_has[0, self.num_dense :].tolist()
            if len(self.cross_src) > 0:
                sv, sl, totals = self.sources(vals, lens2, bids)
                mv: list[torch.Tensor] = []  # merged sources, M rows
                ml: list[torch.Tensor] = []
                mt: list[int] = []  # ids per merged source
                ctx_len: list[int] = lens2[:, 0].tolist()
                for s in range(self.num_ids + self.num_buckets):
                    n0 = ctx_len[s] if s < self.num_ids else (1 if given[s - self.num_ids] else 0)
                    if n0 > 0:  # the context's bag, for every candidate
                        mv.append(sv[s].narrow(0, 0, n0).repeat(m))
                        ml.append(torch.full([m], n0, dtype=torch.int64, device=values.device))
                        mt.append(n0 * m)
                    elif s < self.num_ids:  # row 0's bag is empty: all values are candidates'
                        mv.append(sv[s])
                        ml.append(sl[s][1:])
                        mt.append(totals[s])
                    else:  # a bucket id per row: drop row 0's
                        mv.append(sv[s].narrow(0, 1, m))
                        ml.append(sl[s][1:])
                        mt.append(m)
                zero = torch.zeros(1, dtype=torch.int64, device=values.device)
                for c in range(len(self.cross_src)):
                    cv, cl = self.cross(c, mv, ml, self.one_per_row(c, mt, m))
                    parts_v.append(cv)
                    parts_l.append(torch.cat([zero, cl]))
            for k in self.bucket_out:
                one = torch.ones_like(bids[k])
                if given[k]:
                    parts_v.append(bids[k].narrow(0, 0, 1))
                    parts_l.append(torch.cat([one[:1], one[1:] * 0]))
                else:
                    parts_v.append(bids[k].narrow(0, 1, m))
                    parts_l.append(torch.cat([one[:1] * 0, one[1:]]))
        rows, out_lengths = self.finish(parts_v, parts_l, b)
        x = self.process_dense(numeric)
        if self.num_dense > 0:
            mask = ctx_has[:, : self.num_dense]  # [1, D]
            side = torch.cat([mask, ~mask.expand(m, self.num_dense)], 0)
            x = torch.where(side, x, 0.0)
        return rows, out_lengths, x
