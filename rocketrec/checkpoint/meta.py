"""What a checkpoint's meta.json holds, written and read in one place.

    {"format": 2,
     "step": 1200, "run_id": "...",
     "trainer": Trainer.state_dict(): {"world_size", "progress", "readers", "rng"},
     "spec": the FeatureSpec (its dict form),
     "config": the job config, once: {"data", "model", "loss", "train", "ray", ...},
     "metrics": the last logged or evaluated metrics,
     "sharding": each table's sharding kind (a resume keeps them),
     "versions": {"torch": ...}}

Checkpoints of rocketrec before format 2 kept the counters and reader states at the
top level and each config section twice (`model_config`, ... and `run_config`); the
readers below accept both.
"""

from __future__ import annotations

from typing import Any

import torch

from rocketrec.model.towers import ModelConfig
from rocketrec.spec import FeatureSpec, spec_from_dict

FORMAT = 2
PROGRESS_KEYS = (
    "step", "phase_idx", "phase_start", "epoch_step", "rows_seen", "rows_unused", "loop_seconds"
)  # fmt: skip


def checkpoint_meta(
    trainer: dict[str, Any],
    run_id: str | None,
    spec: FeatureSpec,
    config: dict[str, Any],
    metrics: dict[str, Any] | None,
    sharding: dict[str, str],
) -> dict[str, Any]:
    """meta.json of a checkpoint. `trainer`: Trainer.state_dict(); `config`: every section
    of the job config (the live model, loss and train settings among them)."""
    return {
        "format": FORMAT,
        "step": int(trainer["progress"]["step"]),
        "run_id": run_id,
        "trainer": trainer,
        "spec": spec.to_dict(),
        "config": config,
        "metrics": metrics or {},
        "sharding": sharding,
        "versions": {"torch": torch.__version__},
    }


def saved_config(meta: dict[str, Any], section: str) -> dict[str, Any]:
    """One section of the job config a checkpoint was written with ({} if absent)."""
    if "config" in meta:
        return dict(meta["config"].get(section) or {})
    old = meta.get(f"{section}_config")  # format 1: model_config, loss_config, train_config
    if old is None:
        old = (meta.get("run_config") or {}).get(section)
    return dict(old or {})


def saved_spec(meta: dict[str, Any], source: str) -> FeatureSpec:
    return spec_from_dict(meta["spec"], source=source)


def saved_model_config(meta: dict[str, Any]) -> ModelConfig:
    mc = saved_config(meta, "model")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()})  # type: ignore[arg-type]


def saved_trainer_state(meta: dict[str, Any]) -> dict[str, Any]:
    """The Trainer.state_dict() a checkpoint holds (format 1: rebuilt from its top level;
    it had no RNG state)."""
    if "trainer" in meta:
        return meta["trainer"]
    return {
        "world_size": int(meta["world_size"]),
        "progress": {k: meta[k] for k in PROGRESS_KEYS if k in meta},
        "readers": meta["readers"],
        "rng": None,
    }
