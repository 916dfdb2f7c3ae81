"""The served light module on rocketrec's fused operator (the default export).

Built *from* the portable `LightServing` (same fused tables, same tower, same
preprocessing description), it replaces the ~130 scripted ops of input checks,
preprocessing, lookups and the first layer with one operator call
(rocketrec.serving.ops; C++ source deploy/cpp/rocketrec_ops.cpp):

    forward(values [N], lengths [I*B], dense [B, C]) -> probabilities [B]
        h = light_first_layer(...)            # [B, H]: LayerNorm and the first Linear
        sigmoid(rest(h) . w_head + b_head + log(negative_sample_rate))

    score_candidates(values, lengths, dense [1+M, C]) -> probabilities [M]
        h = light_first_layer_context(...)    # [M, H], the context's share once

The light tower starts with LayerNorm then a Linear W. For a row x (the pooled
embeddings, then the dense columns), W LN(x) = rstd * (W(g*x) - mean * W g) + W beta:
the operator pools x, takes its statistics (float64) and one product with W g, so the
normalized x is never written (`rocketrec::light_first_layer`). For candidates, because
the context's and the candidates' columns are disjoint, for a merged row x = c + y (c
the context's share, y a candidate's):

    sum(x) = sum(c) + sum(y),  sum(x^2) = sum(c^2) + sum(y^2)     (mean, variance)
    W LN(x) = rstd * (W(g*c) + W(g*y) - mean * W g) + W beta

so `W(g*c)` is one [1, K] x [K, H] product per request and each candidate pays only
for its own Kc columns. `rocketrec::light_first_layer_context` does this inside the
operator and returns the first layer's output; the rest of the tower runs here. Towers
of another shape (the booster, packaged for comparisons) run on the pooled rows
(`light_features`, `light_features_context`).
"""

import torch
from torch import nn

from rocketrec.model.towers import LightTower
from rocketrec.serving.module import LightServing
from rocketrec.serving.ops import load_library, pack_config


class FusedLightServing(nn.Module):
    """See the module docstring."""

    int8: bool
    tables: list[torch.Tensor]
    out_dim: int
    logit_offset: float
    split: bool
    eps: float
    dot_head: bool

    def __init__(self, portable: LightServing) -> None:
        super().__init__()
        load_library()  # scripting needs the op's schema
        icfg, fcfg = pack_config(portable)
        self.register_buffer("icfg", icfg)
        self.register_buffer("fcfg", fcfg)
        self.int8 = portable.int8
        groups = range(len(portable.group_dims))
        self.tables = [
            portable._group(g)[2] if self.int8 else portable._group(g)[1] for g in groups
        ]
        self.out_dim = portable.tower_in_dim
        self.logit_offset = portable.logit_offset
        self.tower = portable.tower
        tower = portable.tower
        self.split = isinstance(tower, LightTower)
        self.eps = 1e-5
        if isinstance(tower, LightTower):
            layers = list(tower.mlp) + [tower.head]
            first = layers[0]
            assert isinstance(first, nn.Linear)
            w = first.weight.detach()  # [H, K]
            g = (
                tower.norm.weight.detach()
                if tower.norm.weight is not None
                else torch.ones(w.shape[1])
            )
            beta = (
                tower.norm.bias.detach() if tower.norm.bias is not None else torch.zeros(w.shape[1])
            )
            self.eps = float(tower.norm.eps)
            wg = w * g  # [H, K]
            self.register_buffer("wg_t", wg.t().contiguous())  # [K, H]
            self.register_buffer("wg_sum", wg.sum(1).view(1, -1))  # W g: [1, H]
            b = first.bias.detach() if first.bias is not None else torch.zeros(w.shape[0])
            self.register_buffer("b_eff", (w @ beta + b).view(1, -1))  # W beta + b: [1, H]
            rest = layers[1:]
            # a last Linear to one logit runs as a product and a sum (head_w, head_b): the
            # compilers fuse it with the activation before it and the sigmoid after it into
            # one loop, where a [B, H] x [H, 1] matmul is a library call of its own
            last = rest[-1] if rest else None
            self.dot_head = isinstance(last, nn.Linear) and last.out_features == 1
            if isinstance(last, nn.Linear) and self.dot_head:
                self.register_buffer("head_w", last.weight.detach().reshape(-1).clone())
                hb = last.bias.detach() if last.bias is not None else torch.zeros(1)
                self.register_buffer("head_b", hb.reshape(1).clone())
                rest = rest[:-1]
            else:
                for name in ("head_w", "head_b"):
                    self.register_buffer(name, torch.zeros(0))
            self.rest = nn.Sequential(*rest)
        else:
            for name in ("wg_t", "wg_sum", "b_eff", "head_w", "head_b"):
                self.register_buffer(name, torch.zeros(0, 0))
            self.dot_head = False
            self.rest = nn.Sequential()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tower after its first layer: h [B, H] -> logits [B]."""
        if self.dot_head:
            return (self.rest(h) * self.head_w).sum(-1) + self.head_b
        return self.rest(h).view(-1)

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """values int64 [N], lengths int64 [I*B], dense float32 [B, C] -> probabilities [B]."""
        if not self.split:  # another tower shape (the booster, for comparisons)
            x = torch.ops.rocketrec.light_features(
                values, lengths, dense, self.icfg, self.fcfg, self.tables, self.int8, self.out_dim
            )
            return torch.sigmoid(self.tower(x).view(-1) + self.logit_offset)
        h = torch.ops.rocketrec.light_first_layer(
            values,
            lengths,
            dense,
            self.icfg,
            self.fcfg,
            self.tables,
            self.int8,
            self.wg_t,
            self.wg_sum,
            self.b_eff,
            self.eps,
        )  # [B, H]: LayerNorm and the first Linear, before its activation
        return torch.sigmoid(self._logits(h) + self.logit_offset)

    @torch.jit.export
    def score_candidates(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """Row 0 = one context, rows 1..M = candidates -> probabilities [M]; equals forward
        on the M merged rows (module docstring)."""
        if not self.split:  # another tower shape (the booster, for comparisons): merged rows
            ctx, cand, cols = torch.ops.rocketrec.light_features_context(
                values, lengths, dense, self.icfg, self.fcfg, self.tables, self.int8
            )
            x = ctx.expand(cand.size(0), ctx.size(1)).clone()
            x.index_copy_(1, cols, cand)
            return torch.sigmoid(self.tower(x).view(-1) + self.logit_offset)
        h = torch.ops.rocketrec.light_first_layer_context(
            values,
            lengths,
            dense,
            self.icfg,
            self.fcfg,
            self.tables,
            self.int8,
            self.wg_t,
            self.wg_sum,
            self.b_eff,
            self.eps,
        )  # [M, H]: the first layer's output before its activation
        return torch.sigmoid(self._logits(h) + self.logit_offset)
