"""The exported serving module: the light tower with its tables and its preprocessing.

Serving contract (ARCHITECTURE.md "Contracts"; inputs as in the manifest's
`sparse_features` (id inputs, I of them) and `dense_features` (numeric inputs, C)):

    forward(values int64 [N], lengths int64 [I * B], dense float32 [B, C]) -> float32 [B]
    score_candidates(ctx_values [N0], ctx_lengths [I], ctx_dense [1, C],
                     values [N], lengths [I * M], dense [M, C]) -> float32 [M]

- `lengths` is feature-major (all B bags of input 0, then input 1, ...); `values` are
  raw int64 ids (strings hashed with FNV-1a 64 first); `dense` raw numbers, NaN = missing.
- Inside: `rocketrec.model.preprocess.Preprocess` (the training model's own module:
  max_ids, crosses, bucketizing, id mod rows, fill, transforms); one `embedding_bag`
  call per embedding dim over a fused table with per-feature row offsets (mean pooling
  divides by the bag length itself, which also makes int8 right: the quantized op
  always sums); the tower; sigmoid(logit + log(negative_sample_rate)).
- `score_candidates` scores M candidates for one context: every input is given by the
  context or by the candidates (a non-empty bag / a non-NaN number in the context wins);
  the context's features are looked up once, and the tower's LayerNorm + first Linear
  is split so the context's share of the first layer is computed once. The result
  equals scoring the M merged rows with `forward`.
- Inputs are checked (shapes, lengths non-negative and summing to len(values)) and bad
  ones raise a clear error. Plain torch ops only (int8 uses torch's quantized ops).
"""

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from rocketrec.model.preprocess import Preprocess
from rocketrec.model.towers import LightTower
from rocketrec.spec import FeatureSpec

MAX_DIM_GROUPS = 4  # fused tables: one per embedding dim of the served tower

TableSource = torch.Tensor | Callable[[], Iterable[tuple[int, torch.Tensor]]]
BlockHook = Callable[[str, int, torch.Tensor], None]


def private_table_name(table: str) -> str:
    """Name of the light tower's private table beside shared table `table`."""
    return f"{table}__light"


def _row_blocks(src: TableSource, rows: int = 1 << 20) -> Iterator[tuple[int, torch.Tensor]]:
    if isinstance(src, torch.Tensor):
        for r0 in range(0, src.shape[0], rows):
            yield r0, src[r0 : r0 + rows]
    else:
        yield from src()


def check_servable(spec: FeatureSpec, private_dim: int = 0) -> None:
    """Raise ValueError if export would refuse this spec's light tower (checked before
    training starts, so a run never ends in an unexportable model)."""
    dims = {spec.table(f.table).dim for f in spec.light_sparse}
    if private_dim:
        dims.add(private_dim)
    if len(dims) > MAX_DIM_GROUPS:
        raise ValueError(
            f"{spec.source}: the light tower reads tables of {len(dims)} embedding dims "
            f"({sorted(dims)}); the exported model supports at most {MAX_DIM_GROUPS}: give "
            "the light tower's tables fewer distinct dims"
        )


class LightServing(nn.Module):
    """See the module docstring."""

    num_inputs: int
    num_dense: int
    num_features: int
    twins: bool
    int8: bool
    reorder: bool
    split_first: bool
    group_dims: list[int]
    group_has_mean: list[bool]
    logit_offset: float
    ln_eps: float
    feature_offset: torch.Tensor
    feature_index: torch.Tensor
    group_of_feature: torch.Tensor
    is_mean: torch.Tensor
    col_perm: torch.Tensor
    w_first: torch.Tensor
    b_first: torch.Tensor
    w_first_sum: torch.Tensor
    group_index_0: torch.Tensor
    group_index_1: torch.Tensor
    group_index_2: torch.Tensor
    group_index_3: torch.Tensor
    table_fp32_0: torch.Tensor
    table_fp32_1: torch.Tensor
    table_fp32_2: torch.Tensor
    table_fp32_3: torch.Tensor
    table_int8_0: torch.Tensor
    table_int8_1: torch.Tensor
    table_int8_2: torch.Tensor
    table_int8_3: torch.Tensor

    def __init__(
        self,
        spec: FeatureSpec,
        tables: Mapping[str, TableSource],
        tower: nn.Module,
        int8: bool = False,
        private_dim: int = 0,
        on_block: BlockHook | None = None,
        negative_sample_rate: float = 1.0,
    ) -> None:
        """spec.light_features are served. tables: name -> full weight [R, D], or a
        callable yielding (first row, rows) blocks in order (streamed from a checkpoint);
        on_block sees every block. private_dim > 0: each sparse feature also reads the
        private table `TABLE__light` of that dim (concatenated after the shared ones)."""
        super().__init__()
        self.preprocess = Preprocess(spec, spec.light_features)
        pre = self.preprocess
        self.num_inputs = len(pre.id_inputs)
        self.num_dense = len(pre.numeric_inputs)
        self.logit_offset = float(np.log(negative_sample_rate))
        self.int8 = int8
        # the features looked up, in preprocess order (then their private twins)
        sp = {f.name: f for f in spec.sparse}
        feats: list[tuple[str, str, int, int, str]] = []  # name, table, rows, dim, pooling
        for n in pre.sparse_outputs:
            t = spec.table(sp[n].table)
            feats.append((n, t.name, t.rows, t.dim, t.pooling))
        self.twins = private_dim > 0
        if self.twins:
            feats += [
                (f"{n}__light", private_table_name(t), r, private_dim, p)
                for n, t, r, _, p in list(feats)
            ]
        self.num_features = len(feats)
        dims = sorted({f[3] for f in feats})
        if len(dims) > MAX_DIM_GROUPS:
            raise ValueError(f"the exported tower uses more than {MAX_DIM_GROUPS} embedding dims")
        self.group_dims = dims
        feature_offset = [0] * len(feats)
        group_of = [0] * len(feats)
        members: list[list[int]] = [[] for _ in dims]
        for g, d in enumerate(dims):
            offset = 0
            placed: dict[str, int] = {}
            for i, (_, tname, rows, dim, _) in enumerate(feats):
                if dim != d:
                    continue
                if tname not in placed:  # a table shared by two features is stored once
                    placed[tname] = offset
                    offset += rows
                feature_offset[i] = placed[tname]
                group_of[i] = g
                members[g].append(i)
            # fused tables, filled block by block (never a second copy of a table):
            # fp32, or row-wise int8 (prepacked with per-row scale and bias)
            width = int(torch.ops.quantized.embedding_bag_byte_prepack(torch.zeros(1, d)).shape[1])
            w = torch.empty(offset, width, dtype=torch.uint8) if int8 else torch.empty(offset, d)
            for name, base in placed.items():
                for r0, blk in _row_blocks(tables[name]):
                    blk = blk.detach().float().cpu().contiguous()
                    if on_block is not None:
                        on_block(name, r0, blk)
                    dst = w[base + r0 : base + r0 + blk.shape[0]]
                    dst.copy_(torch.ops.quantized.embedding_bag_byte_prepack(blk) if int8 else blk)
                    del blk
            self.register_buffer(f"table_fp32_{g}", torch.zeros(0, 0) if int8 else w)
            self.register_buffer(
                f"table_int8_{g}", w if int8 else torch.zeros(0, 0, dtype=torch.uint8)
            )
            self.register_buffer(f"group_index_{g}", torch.tensor(members[g], dtype=torch.int64))
        for g in range(len(dims), MAX_DIM_GROUPS):  # TorchScript wants every name the code uses
            self.register_buffer(f"table_fp32_{g}", torch.zeros(0, 0))
            self.register_buffer(f"table_int8_{g}", torch.zeros(0, 0, dtype=torch.uint8))
            self.register_buffer(f"group_index_{g}", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("feature_offset", torch.tensor(feature_offset, dtype=torch.int64))
        self.register_buffer("feature_index", torch.arange(len(feats), dtype=torch.int64))
        self.register_buffer("group_of_feature", torch.tensor(group_of, dtype=torch.int64))
        is_mean = [f[4] == "mean" for f in feats]
        self.register_buffer("is_mean", torch.tensor(is_mean, dtype=torch.bool))
        self.group_has_mean = [any(is_mean[i] for i in m) for m in members]
        # tower input columns: the training model's order = spec order of the shared
        # features, then their twins (same order), then dense
        order = [f.name for f in spec.sparse if f.name in set(pre.sparse_outputs)]
        if self.twins:
            order += [f"{n}__light" for n in order]
        fdim = {f[0]: f[3] for f in feats}
        start, col = {}, 0
        for n in order:
            start[n] = col
            col += fdim[n]
        perm: list[int] = []  # training column of each column after the group concat
        for m in members:
            for i in m:
                n = feats[i][0]
                perm.extend(range(start[n], start[n] + fdim[n]))
        inverse = [0] * len(perm)
        for pos, column in enumerate(perm):
            inverse[column] = pos
        self.reorder = inverse != list(range(len(perm)))
        self.register_buffer("col_perm", torch.tensor(inverse, dtype=torch.int64))
        self.tower = tower
        # LayerNorm -> first Linear, folded for score_candidates:
        # W(g * (x - mu) / s + beta) + b = (W' x - mu W'1) / s + b',  W' = W diag(g)
        self.split_first = isinstance(tower, LightTower)
        self.ln_eps = 1e-5
        w_first, b_first = torch.zeros(0, 0), torch.zeros(0)
        self.after_first = nn.Sequential()
        if isinstance(tower, LightTower):
            mlp = list(tower.mlp)
            first = mlp[0] if mlp else tower.head
            assert isinstance(first, nn.Linear)
            with torch.no_grad():
                w_first = (first.weight * tower.norm.weight).detach().clone()
                b_first = (first.weight @ tower.norm.bias + first.bias).detach().clone()
            self.ln_eps = float(tower.norm.eps)
            self.after_first = nn.Sequential(*mlp[1:], tower.head) if mlp else nn.Sequential()
        self.register_buffer("w_first", w_first)
        self.register_buffer("b_first", b_first)
        self.register_buffer("w_first_sum", w_first.sum(1))

    # -- pieces ---------------------------------------------------------------------
    def _group(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature indices, fp32 table, int8 table) of dim group g."""
        if g == 0:
            return self.group_index_0, self.table_fp32_0, self.table_int8_0
        if g == 1:
            return self.group_index_1, self.table_fp32_1, self.table_int8_1
        if g == 2:
            return self.group_index_2, self.table_fp32_2, self.table_int8_2
        return self.group_index_3, self.table_fp32_3, self.table_int8_3

    def _check(self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor) -> None:
        if dense.dim() != 2 or dense.size(1) != self.num_dense:
            raise ValueError(
                "rocketrec: dense must be float32 [B, "
                + str(self.num_dense)
                + "], got shape "
                + str(list(dense.shape))
            )
        b = dense.size(0)
        if values.dim() != 1 or lengths.dim() != 1:
            raise ValueError("rocketrec: values and lengths must be 1-D int64 tensors")
        if lengths.numel() != self.num_inputs * b:
            raise ValueError(
                "rocketrec: lengths must have I*B = "
                + str(self.num_inputs)
                + "*"
                + str(b)
                + " entries (input-major), got "
                + str(lengths.numel())
            )
        if lengths.numel() > 0:
            lo_sum: list[int] = torch.stack([lengths.min(), lengths.sum()]).tolist()
            if lo_sum[0] < 0:
                raise ValueError("rocketrec: lengths must be non-negative")
            if lo_sum[1] != values.numel():
                raise ValueError(
                    "rocketrec: lengths sum to "
                    + str(lo_sum[1])
                    + " but values has "
                    + str(values.numel())
                    + " entries"
                )
        elif values.numel() != 0:
            raise ValueError("rocketrec: values given but no lengths")

    def embed(self, rows: torch.Tensor, lengths: torch.Tensor, b: int) -> torch.Tensor:
        """Preprocessed rows/lengths [F*B] -> pooled embeddings [B, K] (training order)."""
        if self.twins:  # private tables: every bag is looked up once more
            rows = torch.cat([rows, rows])
            lengths = torch.cat([lengths, lengths])
        f = self.num_features
        lens2 = lengths.view(f, b)
        feat = torch.repeat_interleave(self.feature_index, lens2.sum(1))
        rows = rows + self.feature_offset[feat]
        blocks: list[torch.Tensor] = []
        for g in range(len(self.group_dims)):
            idx, w, packed = self._group(g)
            if len(self.group_dims) == 1:  # one embedding dim: every bag in one call
                glens2 = lens2
                grows = rows
            else:
                glens2 = lens2.index_select(0, idx)
                grows = rows[self.group_of_feature[feat] == g]
            glens = glens2.reshape(-1)
            offsets = torch.cumsum(glens, 0) - glens
            if self.int8:  # always sums (mode is ignored on CPU): mean is done below
                out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                    packed, grows, offsets, False, 0, False, None, None, False
                )
            else:
                out, _, _, _ = torch.embedding_bag(w, grows, offsets, False, 0, False, None, False)
            out = out.view(idx.numel(), b, self.group_dims[g])
            if self.group_has_mean[g]:
                mean = self.is_mean.index_select(0, idx).view(-1, 1, 1)
                denom = torch.clamp_min(glens2, 1).to(out.dtype).unsqueeze(-1)
                out = torch.where(mean, out / denom, out)
            blocks.append(out.transpose(0, 1).reshape(b, -1))  # [B, n_g * d_g]
        emb = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
        if self.reorder:
            emb = emb.index_select(1, self.col_perm)  # back to the training model's order
        return emb

    # -- entry points ---------------------------------------------------------------
    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """values int64 [N], lengths int64 [I*B], dense float32 [B, C] -> probabilities [B]."""
        self._check(values, lengths, dense)
        b = dense.size(0)
        rows, out_lengths, x_dense = self.preprocess(values, lengths, dense)
        x = self.embed(rows, out_lengths, b)
        if self.num_dense > 0 and x_dense.size(1) > 0:
            x = torch.cat([x, x_dense], 1)
        logits = self.tower(x).view(-1)
        return torch.sigmoid(logits + self.logit_offset)

    @torch.jit.export
    def score_candidates(
        self,
        ctx_values: torch.Tensor,
        ctx_lengths: torch.Tensor,
        ctx_dense: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """One context (B = 1) and M candidates -> probabilities [M] (module docstring)."""
        self._check(ctx_values, ctx_lengths, ctx_dense)
        self._check(values, lengths, dense)
        if ctx_dense.size(0) != 1:
            raise ValueError("rocketrec: the context must be one row (ctx_dense [1, C])")
        m = dense.size(0)
        crows, clens, cdense, rows, out_lengths, x_dense = self.preprocess.forward_context(
            ctx_values, ctx_lengths, ctx_dense, values, lengths, dense
        )
        xc = self.embed(crows, clens, 1)  # [1, K]
        xm = self.embed(rows, out_lengths, m)  # [M, K]: zeros where the context gives it
        if x_dense.size(1) > 0:
            xc = torch.cat([xc, cdense], 1)
            xm = torch.cat([xm, x_dense], 1)
        if not self.split_first:
            logits = self.tower(xm + xc).view(-1)
        else:
            # LayerNorm statistics from both sides (disjoint columns: no cross terms)
            k = xc.size(1)
            c64 = xc.double()
            m64 = xm.double()
            s1 = c64.sum(1) + m64.sum(1)
            s2 = (c64 * c64).sum(1) + (m64 * m64).sum(1)
            mu = s1 / k
            rstd = torch.rsqrt(torch.clamp_min(s2 / k - mu * mu, 0.0) + self.ln_eps)
            z = torch.addmm(xc @ self.w_first.t(), xm, self.w_first.t())  # [M, H]
            y = (z - mu.float().unsqueeze(1) * self.w_first_sum) * rstd.float().unsqueeze(
                1
            ) + self.b_first
            logits = self.after_first(y).view(-1)
        return torch.sigmoid(logits + self.logit_offset)
