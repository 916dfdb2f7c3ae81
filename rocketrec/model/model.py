"""Rocket model: shared TorchRec embedding tables, a deep booster and a light tower.

    raw inputs: id bags (KJT, keys = the spec's id features), numbers [B, C] (NaN = missing)
        -> Preprocess: max_ids, crosses, bucketizing, id mod rows; fill + transforms
           (rocketrec.model.preprocess: the same module runs in the exported model)
        -> EmbeddingBagCollection (tables without sequences; sharded by DMP later)
               -> pooled[f]: [B, d_f]
        -> EmbeddingCollection (tables a sequence uses; unpooled, sharded the same way)
               -> sequences: keys [B, L_s, d] + mask [B, L_s]; other features of those
                  tables pooled here by their table's pooling -> pooled[f]: [B, d]
    booster: concat(pooled[f] or, for a sequence s, TargetAttention(pooled[query_s],
             keys_s, mask_s), dense_repr) -> LayerNorm -> low-rank DCN-v2 cross x L
             -> MLP -> Linear -> z_b [B]
    light:   concat(pooled[light], light dense) -> LayerNorm -> MLP -> Linear -> z_l [B]
             (a sequence the light tower lists is a mean-pooled bag, as served)

Legend: B batch, D dense features, d_f embedding dim of feature f, L_s a sequence's
max_len.

The light tower reads the shared tables through `scale_grad(x, s)`:
forward is the identity, backward multiplies the light losses' gradient into
the shared layers by s (1 = the paper, 0 = the light tower reads detached
shared outputs). Pooled embeddings are read by key (`to_dict()`), never by
position: a sharded EBC may return its keys in another order.
`forward` stores nothing on `self`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from rocketrec.errors import ConfigError
from rocketrec.model.init import init_tables
from rocketrec.model.preprocess import Preprocess, bag_positions
from rocketrec.model.towers import (
    BoosterTower,
    LightTower,
    ModelConfig,
    TargetAttention,
    mlp,
    scale_grad,
)
from rocketrec.spec import FeatureSpec, private_table_name


def _bag(name: str, dim: int, rows: int, pooling: str, features: list[str]) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name,
        embedding_dim=dim,
        num_embeddings=rows,
        feature_names=features,
        pooling=PoolingType.SUM if pooling == "sum" else PoolingType.MEAN,
    )


def _private_ebc(
    spec: FeatureSpec, dim: int, device: torch.device
) -> EmbeddingBagCollection | None:
    """Light-only tables (`light_private_dim` > 0): one per table the light tower reads."""
    if dim <= 0:
        return None
    by_light_table: dict[str, list[str]] = {}
    for f in spec.light_sparse:
        by_light_table.setdefault(f.table, []).append(f.name)
    return _ebc(
        [
            _bag(private_table_name(t), dim, spec.table(t).rows, spec.table(t).pooling, names)
            for t, names in by_light_table.items()
        ],
        device,
    )


def _ebc(tables: list[EmbeddingBagConfig], device: torch.device) -> EmbeddingBagCollection:
    """An EBC that draws nothing from the global RNG (its values are set per row later)."""
    with torch.random.fork_rng(devices=[]):
        return EmbeddingBagCollection(tables=tables, device=device)


def _ec(spec: FeatureSpec, device: torch.device) -> EmbeddingCollection | None:
    """The sequence tables (and every other feature of them), looked up unpooled."""
    if not spec.sequence_tables:
        return None
    configs = []
    for name in spec.sequence_tables:
        t = spec.table(name)
        feats = [f.name for f in spec.unpooled_features if f.table == name]
        configs.append(
            EmbeddingConfig(
                name=name, embedding_dim=t.dim, num_embeddings=t.rows, feature_names=feats
            )
        )
    with torch.random.fork_rng(devices=[]):
        return EmbeddingCollection(tables=configs, device=device)


# leaves of TorchRec's fx trace (its train pipeline rewrite): called, not traced into
torch.fx.wrap("pool_jagged")
torch.fx.wrap("pad_jagged")


def jagged_rows(jt: JaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each value [N], position of each value in its row [N]) of a jagged tensor."""
    lengths = jt.lengths()
    n = jt.values().shape[0]
    rows = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=n
    )
    return rows, bag_positions(rows, lengths)


def pool_jagged(jt: JaggedTensor, mean: bool) -> torch.Tensor:
    """Unpooled embeddings (values [N, d], lengths [B]) -> sum or mean per row [B, d];
    an empty row gives 0, as TorchRec's bags and the serving module do."""
    values, lengths = jt.values(), jt.lengths()
    rows, _ = jagged_rows(jt)
    out = torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    out = out.index_add(0, rows, values)
    if mean:
        out = out / lengths.clamp_min(1).to(values.dtype).unsqueeze(1)
    return out


def pad_jagged(jt: JaggedTensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpooled embeddings -> (keys [B, L, d] zero-padded, mask [B, L] True on items)."""
    values, lengths = jt.values(), jt.lengths()
    rows, pos = jagged_rows(jt)
    b = lengths.numel()
    keys = torch.zeros(b, max_len, values.shape[1], dtype=values.dtype, device=values.device)
    keys = keys.index_put((rows, pos), values)
    mask = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return keys, mask


class Featurize(nn.Module):
    """Raw batch fields -> (dense [B, D] processed, KJT of table rows of every sparse
    feature): the preprocessing as TorchRec's train pipeline runs it, a step ahead and
    beside the embedding input distribution (`pipeline_postproc=True`). It has no
    trainable parameters, is called with batch fields (Batch.dense, Batch.sparse) and
    returns the KJT the sharded collection reads."""

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess

    def forward(
        self, numeric: torch.Tensor, sparse: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        rows, lengths, dense = self.preprocess(sparse.values(), sparse.lengths(), numeric)
        kjt = KeyedJaggedTensor(keys=self.preprocess.sparse_outputs, values=rows, lengths=lengths)
        return dense, kjt


class RocketOutput(NamedTuple):
    booster: torch.Tensor | None  # logits [B], None when not computed
    light: torch.Tensor | None  # logits [B], None when not computed


class RocketModel(nn.Module):
    light_dense_index: torch.Tensor  # [D_light] columns of dense the light tower reads

    def __init__(
        self,
        spec: FeatureSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        table_device: torch.device | None = None,
        table_seed: int = 0,
    ) -> None:
        """Tables on `table_device` (default: `device`); `meta` for DMP to materialize shards.

        Off `meta`, tables get the plan-independent per-row init of `table_seed`
        (rocketrec.model.init). Tables never consume the global RNG, so the
        towers' initial weights are the same whatever device the tables are on.
        """
        super().__init__()
        self.spec, self.cfg = spec, cfg
        device = device or torch.device("cpu")
        table_device = table_device or device
        self._build_tables(spec, table_device)
        self.attention = nn.ModuleDict(
            {
                f.name: TargetAttention(spec.table(f.table).dim, cfg.attention_mlp, cfg.attention)
                for f in spec.sequences
            }
        ).to(device)
        self.preprocess = Preprocess(spec).to(device)
        self.featurize = Featurize(self.preprocess)  # the same module, as the pipeline calls it
        dims = {f.name: spec.table(f.table).dim for f in spec.sparse}
        n_dense = len(spec.dense)
        self.light_dense_idx: list[int] = [spec.dense_names.index(f.name) for f in spec.light_dense]
        self.register_buffer(
            "light_dense_index",
            torch.tensor(self.light_dense_idx, dtype=torch.int64),
            persistent=False,
        )
        self.light_sparse = [f.name for f in spec.light_sparse]
        dense_out = self._build_bottom(cfg, n_dense)
        self.light_uses_bottom = self.bottom is not None and len(self.light_dense_idx) == n_dense
        booster_in = sum(dims.values()) + dense_out
        light_in = sum(dims[n] for n in self.light_sparse) + (
            dense_out if self.light_uses_bottom else len(self.light_dense_idx)
        )
        # optional light-only embedding part: one private table per table the light tower uses
        if cfg.light_private_dim and any(
            f.kind == "sequence" and spec.table(f.table).pooling != "mean"
            for f in spec.light_sparse
        ):
            raise ConfigError(
                "light_private_dim: the light tower reads a sequence whose table pools by sum; "
                "its private twin would pool differently: give that table pooling: mean"
            )
        self.light_ebc = _private_ebc(spec, cfg.light_private_dim, table_device)
        light_in += cfg.light_private_dim * len(self.light_sparse)
        self.booster = BoosterTower(booster_in, cfg).to(device)
        self.light = LightTower(light_in, cfg).to(device)
        if self.bottom is not None:
            self.bottom.to(device)
        if table_device.type != "meta":
            init_tables(self.state_dict(), table_seed)

    def _build_tables(self, spec: FeatureSpec, table_device: torch.device) -> None:
        """The pooled tables (an EmbeddingBagCollection) and the sequence tables (an
        EmbeddingCollection: unpooled lookups, pooled by the model where a bag reads them)."""
        by_table: dict[str, list[str]] = {}
        for f in spec.pooled_features:
            by_table.setdefault(f.table, []).append(f.name)
        bag_tables = [t for t in spec.tables if t.name in by_table]
        self.ebc: EmbeddingBagCollection | None = (
            _ebc(
                [_bag(t.name, t.dim, t.rows, t.pooling, by_table[t.name]) for t in bag_tables],
                table_device,
            )
            if bag_tables
            else None
        )
        # sequence tables: unpooled lookups; (name, pool as mean) of their bag features,
        # (name, max_len, query) of their sequences
        self.ec = _ec(spec, table_device)
        self.unpooled_bags = [
            (f.name, spec.pooling(f) == "mean")
            for f in spec.unpooled_features
            if f.kind != "sequence" or f.name in spec.light_features
        ]
        self.sequences = [(f.name, int(f.max_ids or 0), str(f.query)) for f in spec.sequences]
        self.sequence_names = {f.name for f in spec.sequences}

    def _build_bottom(self, cfg: ModelConfig, n_dense: int) -> int:
        """The optional shared bottom MLP over the dense features; returns its width."""
        dense_out = n_dense
        self.bottom: nn.Module | None = None
        if cfg.shared_bottom:
            if n_dense == 0:
                raise ConfigError("shared_bottom needs dense features")
            if 0 < len(self.light_dense_idx) < n_dense:
                raise ConfigError(
                    "shared_bottom reads every dense feature, but the light tower reads only "
                    "some of them: drop shared_bottom or give the light tower all dense features"
                )
            self.bottom, dense_out = mlp(n_dense, cfg.shared_bottom)
        return dense_out

    def features(
        self, numeric: torch.Tensor, sparse: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """Raw inputs -> (dense [B, D] processed, KJT of table rows of every sparse feature)."""
        out: tuple[torch.Tensor, KeyedJaggedTensor] = self.featurize(numeric, sparse)
        return out

    def trace_inputs(self) -> dict[str, Any]:
        """`concrete_args` of TorchRec's fx trace of `forward` (the train pipeline's
        rewrite, via Batch.to_proxy_tuple): the raw inputs as placeholders naming their
        Batch field, so that the pipeline finds `featurize`'s arguments in the batch;
        the plan arguments fixed (the trace only locates the sharded modules' inputs)."""
        from torch.fx._symbolic_trace import PHWithMeta

        return {
            "numeric": PHWithMeta(ph_key="dense"),
            "sparse": PHWithMeta(ph_key="sparse"),
            "run_booster": True,
            "run_light": True,
            "light_shared_grad_scale": 1.0,
        }

    def forward(
        self,
        numeric: torch.Tensor,
        sparse: KeyedJaggedTensor,
        run_booster: bool = True,
        run_light: bool = True,
        light_shared_grad_scale: float = 1.0,
    ) -> RocketOutput:
        """Raw inputs (Batch.dense, Batch.sparse) -> RocketOutput(logits [B] or None).

        Which towers run and the light losses' gradient scale into the shared layers
        come from the caller (the train task applies its phase's PhasePlan); the model
        holds no run state."""
        f = self.featurize(numeric, sparse)  # indexed, not unpacked: TorchRec fx-traces this
        return self.forward_features(f[0], f[1], run_booster, run_light, light_shared_grad_scale)

    def forward_features(
        self,
        dense: torch.Tensor,
        bucketed: KeyedJaggedTensor,
        run_booster: bool = True,
        run_light: bool = True,
        light_shared_grad_scale: float = 1.0,
    ) -> RocketOutput:
        """Preprocessed inputs (see `features`) -> RocketOutput(logits [B] or None)."""
        # by key, never by position; each collection picks its own features of `bucketed`
        # (plain dicts filled by name: TorchRec's fx trace cannot iterate its outputs)
        pooled = self.ebc(bucketed).to_dict() if self.ebc is not None else {}
        emb: dict[str, torch.Tensor] = {}
        seq_jt: dict[str, JaggedTensor] = {}
        if self.ec is not None:
            seq_jt = self.ec(bucketed)
            for name, mean in self.unpooled_bags:
                emb[name] = pool_jagged(seq_jt[name], mean)
        for name in self.spec.sparse_names:
            if name not in emb and name not in self.sequence_names:
                emb[name] = pooled[name]
        dense_repr = self.bottom(dense) if self.bottom is not None else dense
        z_b = z_l = None
        if run_booster:
            attended: dict[str, torch.Tensor] = {}
            for name, max_len, query in self.sequences:
                # booster only: the candidate's embedding attends over the history
                keys, mask = pad_jagged(seq_jt[name], max_len)
                attended[name] = self.attention[name](emb[query], keys, mask)
            z_b = self.booster(
                torch.cat(
                    [attended[n] if n in attended else emb[n] for n in self.spec.sparse_names]
                    + [dense_repr],
                    1,
                )
            )
        if run_light:
            # the scale sets how much of the light losses' gradient reaches the shared layers
            parts = [
                scale_grad(
                    torch.cat([emb[n] for n in self.light_sparse], 1), light_shared_grad_scale
                )
            ]
            if self.light_ebc is not None:
                # private tables: trained by the light losses only, never scaled
                keys = bucketed.keys()
                light_kjt = bucketed.permute([keys.index(n) for n in self.light_sparse])
                private = self.light_ebc(light_kjt).to_dict()
                parts += [private[n] for n in self.light_sparse]
            if self.light_uses_bottom:
                parts.append(scale_grad(dense_repr, light_shared_grad_scale))
            elif self.light_dense_idx:
                parts.append(dense.index_select(1, self.light_dense_index))
            z_l = self.light(torch.cat(parts, 1))
        return RocketOutput(z_b, z_l)
