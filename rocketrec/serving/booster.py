"""The booster with its target attention, as a serving module (`export --booster` on a
spec with sequences): for latency comparisons against the light tower, never the
model a team ships.

It wraps a portable `LightServing` built for every feature (the booster's input
layout: each feature's pooled embedding in spec order, then the dense columns), so
the preprocessing, the request checks and the fused tables are the light module's.
Each sequence's pooled (mean) columns are then replaced by the booster's attention
output: the sequence's items are gathered unpooled from the same fused table (fp32
rows, or int8 rows dequantized by a one-item bag each), padded to `max_len`, and
attended by the candidate's pooled query embedding, as the training model does.

`score_candidates` (row 0 the context, rows 1..M candidates) merges the rows as the
light module does: a feature is wholly on one side, so the candidates' merged input
is the candidate's share plus the context's, and a history in the context is
attended by each candidate's query. The fused operator pools every lookup, so this
module runs on plain torch ops (the manifest names no op library).
"""

import torch
from torch import nn

from rocketrec.model.preprocess import bag_positions
from rocketrec.serving.module import LightServing
from rocketrec.spec import FeatureSpec


class AttentionBoosterServing(nn.Module):
    seq_feature: list[int]  # per sequence: its lookup index in the fused module
    seq_group: list[int]  # its dim group (which fused table)
    seq_col: list[int]  # its first column in the tower input
    seq_dim: list[int]
    seq_max_len: list[int]
    query_col: list[int]  # the query's first column in the tower input
    num_features: int
    int8: bool

    def __init__(self, inner: LightServing, spec: FeatureSpec, attention: nn.ModuleDict) -> None:
        super().__init__()
        self.inner = inner
        self.int8 = inner.int8
        self.num_features = inner.num_features
        outputs = list(inner.preprocess.sparse_outputs)
        group_of = inner.group_of_feature.tolist()
        self.seq_feature, self.seq_group, self.seq_col = [], [], []
        self.seq_dim, self.seq_max_len, self.query_col = [], [], []
        units = []
        for f in spec.sequences:
            i = outputs.index(f.name)
            col, dim = inner.lookup_layout[i]
            self.seq_feature.append(i)
            self.seq_group.append(int(group_of[i]))
            self.seq_col.append(int(col))
            self.seq_dim.append(int(dim))
            self.seq_max_len.append(int(f.max_ids or 1))
            self.query_col.append(int(inner.lookup_layout[outputs.index(str(f.query))][0]))
            units.append(attention[f.name])
        self.attention = nn.ModuleList(units)

    def _items(self, g: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Unpooled rows of fused table g -> [N, dim] float32."""
        _, w, packed = self.inner._group(g)
        if self.int8:  # a bag of one item each: the row dequantized
            offsets = torch.arange(rows.numel(), dtype=torch.int64)
            out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                packed, rows, offsets, False, 0, False, None, None, False
            )
        else:
            out = w.index_select(0, rows)
        return out[:, :dim]

    def _attend(
        self, x: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, b: int, merged: bool
    ) -> torch.Tensor:
        """Replace each sequence's pooled columns of x by its attention output. x holds
        the rows scored: b rows, or with `merged` the b - 1 candidates (context added)."""
        lens2 = lengths.view(self.num_features, b)
        counts = lens2.sum(1)
        ends = torch.cumsum(counts, 0)
        for k, unit in enumerate(self.attention):
            i, d, cap = self.seq_feature[k], self.seq_dim[k], self.seq_max_len[k]
            n = int(counts[i])
            start = int(ends[i]) - n
            items = self._items(self.seq_group[k], rows.narrow(0, start, n), d)
            li = lens2[i]
            row_of = torch.repeat_interleave(torch.arange(b), li, output_size=n)
            pos = bag_positions(row_of, li)  # the training code's padding (model.pad_jagged)
            keys = torch.zeros(b, cap, d, dtype=items.dtype)
            keys = keys.index_put((row_of, pos), items)
            mask = torch.arange(cap).unsqueeze(0) < li.unsqueeze(1)
            if merged:  # the history is the context's (row 0) or each candidate's own
                keys = keys[1:] + keys[0:1]
                mask = mask[1:] | mask[0:1]
            c, qc = self.seq_col[k], self.query_col[k]
            att = unit(x.narrow(1, qc, d), keys, mask)
            x = torch.cat([x.narrow(1, 0, c), att, x.narrow(1, c + d, x.size(1) - c - d)], 1)
        return x

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """values int64 [N], lengths int64 [I*B], dense float32 [B, C] -> probabilities [B]."""
        m = self.inner
        m._check(values, lengths, dense)
        b = dense.size(0)
        rows, out_lengths, x_dense = m.preprocess(values, lengths, dense)
        x = self._attend(m.embed(rows, out_lengths, b), rows, out_lengths, b, False)
        if m.num_dense > 0 and x_dense.size(1) > 0:
            x = torch.cat([x, x_dense], 1)
        return torch.sigmoid(m.tower(x).view(-1) + m.logit_offset)

    @torch.jit.export
    def score_candidates(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """Row 0 = one context, rows 1..M = candidates -> probabilities [M]."""
        m = self.inner
        m._check(values, lengths, dense)
        b = dense.size(0)
        if b < 2:
            raise ValueError("rocketrec: score_candidates needs the context row and >= 1 candidate")
        rows, out_lengths, x_dense = m.preprocess.forward_context(values, lengths, dense)
        x = m.embed(rows, out_lengths, b)
        if x_dense.size(1) > 0:
            x = torch.cat([x, x_dense], 1)
        x = self._attend(x[1:] + x[0:1], rows, out_lengths, b, True)
        return torch.sigmoid(m.tower(x).view(-1) + m.logit_offset)
