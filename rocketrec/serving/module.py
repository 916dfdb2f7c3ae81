"""The exported serving module: the light tower with its tables and its preprocessing.

Serving contract (deploy/README.md section 2; inputs as in the manifest's
`sparse_features` (id inputs, I of them) and `dense_features` (numeric inputs, C)):

    forward(values int64 [N], lengths int64 [I * B], dense float32 [B, C]) -> float32 [B]
    score_candidates(values [N], lengths [I * (1 + M)], dense [1 + M, C]) -> float32 [M]
        row 0 is the context, rows 1..M the candidates

- `lengths` is feature-major (all B bags of input 0, then input 1, ...); `values` are
  raw int64 ids (strings hashed with FNV-1a 64 first); `dense` raw numbers, NaN = missing.
- Inside: `rocketrec.model.preprocess.Preprocess` (the training model's own module:
  max_ids, crosses, bucketizing, id mod rows, fill, transforms); one `embedding_bag`
  call per embedding dim over a fused table with per-feature row offsets (mean pooling
  divides by the bag length itself, which also makes int8 right: the quantized op
  always sums); the tower; sigmoid(logit + log(negative_sample_rate)).
- `score_candidates` scores M candidates for one context (row 0): every input is given
  by the context or by the candidates (a non-empty bag / a non-NaN number in the
  context wins); the context's bags are preprocessed and looked up once, its share of
  the tower input (embeddings and dense columns) is added to each candidate's share.
  The result equals scoring the M merged rows with `forward`.
- Inputs are checked (shapes, lengths non-negative and summing to len(values)) and bad
  ones raise a clear error. Plain torch ops only (int8 uses torch's quantized ops).
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from rocketrec.errors import ExportError
from rocketrec.model.preprocess import Preprocess
from rocketrec.spec import FeatureSpec, private_table_name

MAX_DIM_GROUPS = 4  # fused tables: one per embedding dim of the served tower
PAD_WASTE = 0.25  # one fused table (smaller dims zero-padded) when that costs <= 25% more

TableSource = torch.Tensor | Callable[[], Iterable[tuple[int, torch.Tensor]]]
BlockHook = Callable[[str, int, torch.Tensor], None]


def _row_blocks(src: TableSource, rows: int = 1 << 20) -> Iterator[tuple[int, torch.Tensor]]:
    if isinstance(src, torch.Tensor):
        for r0 in range(0, src.shape[0], rows):
            yield r0, src[r0 : r0 + rows]
    else:
        yield from src()


def check_servable(spec: FeatureSpec, private_dim: int = 0) -> None:
    """Raise ValueError if export would refuse this spec's light tower."""
    dims = {spec.table(f.table).dim for f in spec.light_sparse}
    if private_dim:
        dims.add(private_dim)
    if len(dims) > MAX_DIM_GROUPS:
        raise ExportError(
            f"{spec.source}: the light tower reads tables of {len(dims)} embedding dims "
            f"({sorted(dims)}); the exported model supports at most {MAX_DIM_GROUPS}: give "
            "the light tower's tables fewer distinct dims"
        )


def check_exportable(spec: FeatureSpec, model_cfg: Any, mode: str) -> None:
    """Refuse, before training starts, a run whose light tower export would refuse."""
    if mode == "booster_only":
        return  # no light tower is trained or exported
    if model_cfg.shared_bottom:
        raise ExportError(
            "--shared-bottom: the exported light tower cannot serve a shared dense bottom "
            "(export refuses it): train without it, or with --mode booster_only"
        )
    check_servable(spec, model_cfg.light_private_dim)


Feat = tuple[str, str, int, int, str]  # name, table, rows, dim, pooling


def _looked_up(spec: FeatureSpec, outputs: list[str], private_dim: int) -> list[Feat]:
    """The features looked up, in preprocess order (then their private twins)."""
    sp = {f.name: f for f in spec.sparse}
    feats: list[Feat] = []
    for n in outputs:
        t = spec.table(sp[n].table)
        feats.append((n, t.name, t.rows, t.dim, spec.pooling(sp[n])))
    if private_dim > 0:
        feats += [
            (private_table_name(n), private_table_name(t), r, private_dim, p)
            for n, t, r, _, p in list(feats)
        ]
    return feats


def _group_dims(feats: list[Feat]) -> list[int]:
    """One fused table per dim; or, when padding the smaller dims' tables to the largest
    dim costs at most PAD_WASTE more table memory, one table (one lookup call)."""
    dims = sorted({f[3] for f in feats})
    if len(dims) > MAX_DIM_GROUPS:
        raise ExportError(f"the exported tower uses more than {MAX_DIM_GROUPS} embedding dims")
    sizes = {t: (r, d) for _, t, r, d, _ in feats}
    total = sum(r * d for r, d in sizes.values())
    waste = sum(r * (dims[-1] - d) for r, d in sizes.values())
    return dims[-1:] if len(dims) > 1 and waste <= PAD_WASTE * total else dims


def _fused_table(
    tables: Mapping[str, TableSource],
    placed: dict[str, int],
    rows: int,
    d: int,
    int8: bool,
    on_block: BlockHook | None,
) -> torch.Tensor:
    """A fused table filled block by block (never a second copy of a table): fp32, or
    row-wise int8 (prepacked with per-row scale and bias); a table of a smaller dim is
    stored zero-padded to d."""
    width = int(torch.ops.quantized.embedding_bag_byte_prepack(torch.zeros(1, d)).shape[1])
    w = torch.empty(rows, width, dtype=torch.uint8) if int8 else torch.empty(rows, d)
    for name, base in placed.items():
        for r0, blk in _row_blocks(tables[name]):
            blk = blk.detach().float().cpu().contiguous()
            if on_block is not None:
                on_block(name, r0, blk)
            if blk.shape[1] < d:
                blk = torch.nn.functional.pad(blk, (0, d - blk.shape[1]))
            dst = w[base + r0 : base + r0 + blk.shape[0]]
            dst.copy_(torch.ops.quantized.embedding_bag_byte_prepack(blk) if int8 else blk)
            del blk
    return w


def _columns(
    spec: FeatureSpec,
    outputs: list[str],
    feats: list[Feat],
    members: list[list[int]],
    dims: list[int],
) -> tuple[dict[str, int], int, list[int], int]:
    """Tower input columns: the training model's order = spec order of the shared
    features, then their twins (same order), then dense. Returns (first column of each
    feature, sparse columns, for each training column its column after the group
    concat, the padded width of the concat)."""
    order = [f.name for f in spec.sparse if f.name in set(outputs)]
    if len(feats) > len(outputs):  # private twins
        order += [private_table_name(n) for n in order]
    fdim = {f[0]: f[3] for f in feats}
    start, col = {}, 0
    for n in order:
        start[n] = col
        col += fdim[n]
    inverse = [0] * col
    pos = 0
    for g, m in enumerate(members):
        for i in m:
            n = feats[i][0]
            for c in range(fdim[n]):
                inverse[start[n] + c] = pos + c
            pos += dims[g]  # padded width
    return start, col, inverse, pos


class LightServing(nn.Module):
    """See the module docstring."""

    # Python-side layout for the fused module (rocketrec.serving.fused), not scripted
    __jit_ignored_attributes__ = ["lookup_layout", "feature_pooling", "tower_in_dim"]

    num_inputs: int
    num_dense: int
    num_features: int
    twins: bool
    int8: bool
    reorder: bool
    group_dims: list[int]
    group_has_mean: list[bool]
    logit_offset: float
    feature_index: torch.Tensor
    group_of_feature: torch.Tensor
    is_mean: torch.Tensor
    col_perm: torch.Tensor
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
        feats = _looked_up(spec, pre.sparse_outputs, private_dim)
        self.twins = private_dim > 0
        self.num_features = len(feats)
        dims = _group_dims(feats)
        self.group_dims = dims
        feature_offset = [0] * len(feats)
        group_of = [0] * len(feats)
        members: list[list[int]] = [[] for _ in dims]
        for g, d in enumerate(dims):
            offset = 0
            placed: dict[str, int] = {}
            for i, (_, tname, rows, dim, _) in enumerate(feats):
                if len(dims) > 1 and dim != d:
                    continue
                if tname not in placed:  # a table shared by two features is stored once
                    placed[tname] = offset
                    offset += rows
                feature_offset[i] = placed[tname]
                group_of[i] = g
                members[g].append(i)
            w = _fused_table(tables, placed, offset, d, int8, on_block)
            self.register_buffer(f"table_fp32_{g}", torch.zeros(0, 0) if int8 else w)
            self.register_buffer(
                f"table_int8_{g}", w if int8 else torch.zeros(0, 0, dtype=torch.uint8)
            )
            self.register_buffer(f"group_index_{g}", torch.tensor(members[g], dtype=torch.int64))
        for g in range(len(dims), MAX_DIM_GROUPS):  # TorchScript wants every name the code uses
            self.register_buffer(f"table_fp32_{g}", torch.zeros(0, 0))
            self.register_buffer(f"table_int8_{g}", torch.zeros(0, 0, dtype=torch.uint8))
            self.register_buffer(f"group_index_{g}", torch.zeros(0, dtype=torch.int64))
        # rows of the fused tables: id mod rows + offset, inside the preprocessing
        pre.configure_lookup(feature_offset, self.twins)
        self.register_buffer("feature_index", torch.arange(len(feats), dtype=torch.int64))
        self.register_buffer("group_of_feature", torch.tensor(group_of, dtype=torch.int64))
        is_mean = [f[4] == "mean" for f in feats]
        self.register_buffer("is_mean", torch.tensor(is_mean, dtype=torch.bool))
        self.group_has_mean = [any(is_mean[i] for i in m) for m in members]
        start, col, inverse, pos = _columns(spec, pre.sparse_outputs, feats, members, dims)
        self.reorder = inverse != list(range(pos))
        # the fused operator's layout (rocketrec.serving.ops): per lookup, (the tower input's
        # first column, the feature's dim), in lookup order; then the dense columns
        self.lookup_layout = [(start[f[0]], f[3]) for f in feats]
        self.feature_pooling = is_mean
        self.tower_in_dim = col + len(pre.dense_outputs)
        self.register_buffer("col_perm", torch.tensor(inverse, dtype=torch.int64))
        self.tower = tower

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
            if int(lengths.min()) < 0:
                raise ValueError("rocketrec: lengths must be non-negative")
            total = int(lengths.sum())
            if total != values.numel():
                raise ValueError(
                    "rocketrec: lengths sum to "
                    + str(total)
                    + " but values has "
                    + str(values.numel())
                    + " entries"
                )
        elif values.numel() != 0:
            raise ValueError("rocketrec: values given but no lengths")

    def embed(self, rows: torch.Tensor, lengths: torch.Tensor, b: int) -> torch.Tensor:
        """Preprocessed rows of the fused tables, lengths [F*B] (twins included) -> pooled
        embeddings [B, K] (training order)."""
        f = self.num_features
        lens2 = lengths.view(f, b)
        feat = rows  # the feature of each row: only needed with several groups
        if len(self.group_dims) > 1:
            feat = torch.repeat_interleave(
                self.feature_index, lens2.sum(1), output_size=rows.numel()
            )
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
            if self.group_has_mean[g]:  # mean = sum / bag length (empty bags stay 0)
                inv = torch.reciprocal(torch.clamp_min(glens2, 1).to(out.dtype))
                mean = self.is_mean.index_select(0, idx).view(-1, 1)
                out = out * torch.where(mean, inv, 1.0).unsqueeze(-1)
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
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """Row 0 = one context, rows 1..M = candidates -> probabilities [M]; equals forward
        on the M merged rows (module docstring)."""
        self._check(values, lengths, dense)
        b = dense.size(0)
        if b < 2:
            raise ValueError("rocketrec: score_candidates needs the context row and >= 1 candidate")
        rows, out_lengths, x_dense = self.preprocess.forward_context(values, lengths, dense)
        x = self.embed(rows, out_lengths, b)  # [1 + M, K]: row 0 the context's share
        if x_dense.size(1) > 0:
            x = torch.cat([x, x_dense], 1)
        # the merged rows' tower input: each candidate's share plus the context's (disjoint
        # columns); the tower's LayerNorm needs whole rows, so its first layer runs on these
        logits = self.tower(x[1:] + x[0:1]).view(-1)
        return torch.sigmoid(logits + self.logit_offset)
