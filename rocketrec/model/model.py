"""Rocket model: shared TorchRec embedding tables, a deep booster and a light tower.

    raw inputs: id bags (KJT, keys = the spec's id features), numbers [B, C] (NaN = missing)
        -> Preprocess: max_ids, crosses, bucketizing, id mod rows; fill + transforms
           (rocketrec.model.preprocess: the same module runs in the exported model)
        -> EmbeddingBagCollection (all tables; sharded by DMP later)  -> pooled[f]: [B, d_f]
    booster: concat(pooled[all], dense_repr)    -> LayerNorm -> low-rank DCN-v2 cross x L
             -> MLP -> Linear -> z_b [B]
    light:   concat(pooled[light], light dense) -> LayerNorm -> MLP -> Linear -> z_l [B]

Legend: B batch, D dense features, d_f embedding dim of feature f.

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
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from rocketrec.model.init import init_tables
from rocketrec.model.preprocess import Preprocess
from rocketrec.model.towers import (  # noqa: F401 - re-exported
    BoosterTower,
    LightTower,
    LowRankCross,
    ModelConfig,
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
        by_table: dict[str, list[str]] = {}
        for f in spec.sparse:
            by_table.setdefault(f.table, []).append(f.name)
        self.ebc = _ebc(
            [_bag(t.name, t.dim, t.rows, t.pooling, by_table[t.name]) for t in spec.tables],
            table_device,
        )
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
        dense_out = n_dense
        self.bottom: nn.Module | None = None
        if cfg.shared_bottom:
            if n_dense == 0:
                raise ValueError("shared_bottom needs dense features")
            if 0 < len(self.light_dense_idx) < n_dense:
                raise ValueError(
                    "shared_bottom reads every dense feature, but the light tower reads only "
                    "some of them: drop shared_bottom or give the light tower all dense features"
                )
            self.bottom, dense_out = mlp(n_dense, cfg.shared_bottom)
        self.light_uses_bottom = self.bottom is not None and len(self.light_dense_idx) == n_dense
        booster_in = sum(dims.values()) + dense_out
        light_in = sum(dims[n] for n in self.light_sparse) + (
            dense_out if self.light_uses_bottom else len(self.light_dense_idx)
        )
        # optional light-only embedding part: one private table per table the light tower uses
        self.light_ebc = _private_ebc(spec, cfg.light_private_dim, table_device)
        light_in += cfg.light_private_dim * len(self.light_sparse)
        self.booster = BoosterTower(booster_in, cfg).to(device)
        self.light = LightTower(light_in, cfg).to(device)
        if self.bottom is not None:
            self.bottom.to(device)
        if table_device.type != "meta":
            init_tables(self.state_dict(), table_seed)

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
        pooled = self.ebc(bucketed).to_dict()  # by key, never by position
        dense_repr = self.bottom(dense) if self.bottom is not None else dense
        z_b = z_l = None
        if run_booster:
            z_b = self.booster(
                torch.cat([pooled[n] for n in self.spec.sparse_names] + [dense_repr], 1)
            )
        if run_light:
            # the scale sets how much of the light losses' gradient reaches the shared layers
            parts = [
                scale_grad(
                    torch.cat([pooled[n] for n in self.light_sparse], 1), light_shared_grad_scale
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
