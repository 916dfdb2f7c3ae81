"""Towers and the gradient-scale op: plain torch, no TorchRec (also used on GPU checks).

BoosterTower: LayerNorm -> low-rank DCN-v2 cross layers -> MLP -> Linear -> logit
LightTower:   LayerNorm -> MLP -> Linear -> logit
TargetAttention: DIN's activation unit over a behaviour sequence (booster only)
scale_grad:   identity forward, gradient x scale backward
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rocketrec.errors import ConfigError
from rocketrec.settings import layer_sizes, setting

ATTENTIONS = ("softmax", "din", "mean")


@dataclass(frozen=True)
class ModelConfig:
    cross_layers: int = setting(3, "DCN-v2 cross layers of the booster", resume=False)
    cross_rank: int = setting(32, "low rank of each cross layer", resume=False)
    booster_mlp: tuple[int, ...] = setting(
        (256, 128, 64), "the booster's MLP, e.g. 256,128,64", resume=False, parse=layer_sizes
    )
    light_mlp: tuple[int, ...] = setting(
        (32,), "the light tower's MLP, e.g. 32", resume=False, parse=layer_sizes
    )
    shared_bottom: tuple[int, ...] = setting(
        help="optional dense MLP shared by both towers, e.g. 64,32",
        resume=False,
        default_factory=tuple,
        parse=layer_sizes,
    )
    light_private_dim: int = setting(
        0,
        "dim of a light-only embedding part beside the shared tables (0 = none): each light "
        "feature also reads a private table trained by the light losses only",
        resume=False,
    )
    attention: str = setting(
        "softmax",
        "how the booster reads a behaviour sequence: softmax = DIN's activation unit with a "
        "masked softmax, din = its raw weights, mean = mean pooling",
        resume=False,
        choices=ATTENTIONS,
    )
    attention_mlp: tuple[int, ...] = setting(
        (32,),
        "hidden sizes of the attention's activation unit, e.g. 32",
        resume=False,
        parse=layer_sizes,
    )

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(
                f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}"
            )
        if self.light_private_dim < 0 or self.light_private_dim % 4:
            raise ConfigError(
                f"light_private_dim must be 0 or a positive multiple of 4 (fbgemm's embedding "
                f"kernels need it), got {self.light_private_dim}"
            )
        if self.cross_layers < 0 or self.cross_rank < 1:
            raise ConfigError("cross_layers must be >= 0 and cross_rank >= 1")
        for name in ("booster_mlp", "light_mlp", "shared_bottom", "attention_mlp"):
            if any(int(x) < 1 for x in getattr(self, name)):
                raise ConfigError(f"{name}: every layer size must be >= 1")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; gradient times `scale` backward (0 detaches, 1 is a no-op)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()  # blocks the light losses from the shared layers entirely
    return _ScaleGrad.apply(x, scale)


def mlp(in_dim: int, sizes: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for s in sizes:
        layers += [nn.Linear(in_dim, s), nn.ReLU()]
        in_dim = s
    return nn.Sequential(*layers), in_dim


class LowRankCross(nn.Module):
    """DCN-v2 low-rank cross layer: x_{l+1} = x0 * (U (V x_l) + b) + x_l. x: [B, K]."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, rank, bias=False)
        self.u = nn.Linear(rank, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.u(self.v(x)) + x


class BoosterTower(nn.Module):
    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.cross = nn.ModuleList(
            LowRankCross(in_dim, cfg.cross_rank) for _ in range(cfg.cross_layers)
        )
        self.mlp, out = mlp(in_dim, cfg.booster_mlp)
        self.head = nn.Linear(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, K] -> logits [B]."""
        x0 = self.norm(x)
        h = x0
        for layer in self.cross:
            h = layer(x0, h)
        return self.head(self.mlp(h)).squeeze(-1)


class LightTower(nn.Module):
    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp, out = mlp(in_dim, cfg.light_mlp)
        self.head = nn.Linear(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, K_light] -> logits [B]."""
        return self.head(self.mlp(self.norm(x))).squeeze(-1)


class TargetAttention(nn.Module):
    """DIN's activation unit (Zhou et al., KDD 2018): the candidate's embedding q attends
    over a behaviour sequence k_1..k_L.

        q [B, d], keys [B, L, d], mask [B, L] (True = a real item, False = padding)
        score_i = MLP([q, k_i, q - k_i, q * k_i]) -> [B, L]
        softmax: w = masked softmax(score)   din: w = score (raw)   mean: w = 1 / length
        out = sum_i w_i k_i -> [B, d]   (an empty history gives 0)
    """

    def __init__(self, dim: int, hidden: tuple[int, ...], kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.unit: nn.Module | None = None
        if kind != "mean":
            body, out = mlp(4 * dim, hidden)
            # no bias before a softmax: it cancels, its gradient is rounding noise that Adam
            # would turn into steps of the learning rate's size
            self.unit = nn.Sequential(body, nn.Linear(out, 1, bias=kind != "softmax"))

    def forward(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(keys.dtype)  # [B, L]
        if self.unit is None:
            w = m / m.sum(1, keepdim=True).clamp_min(1.0)
        else:
            qq = q.unsqueeze(1).expand_as(keys)
            score = self.unit(torch.cat([qq, keys, qq - keys, qq * keys], -1)).squeeze(-1)
            if self.kind == "softmax":
                # finite fill, then x mask: a row with no history gets weights 0 (no NaN,
                # which -inf would give in the forward and the backward)
                w = torch.softmax(score.masked_fill(~mask, -1e9), 1) * m
            else:
                w = score * m
        return torch.bmm(w.unsqueeze(1), keys).squeeze(1)
