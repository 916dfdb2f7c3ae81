"""One job config: every setting of a training job, typed, frozen and checked once.

    JobConfig(data, model, loss, train, ray)      ray is None for `rocketrec train`
    job.to_dict() / JobConfig.from_dict(d)       the serialized form: RUN/config.yaml,
                                                 and what Ray workers receive

Sections and keys are the flags' groups and names (`--batch-size` is
`train.batch_size`), so the serialized form is also a run config file
(`--config RUN/config.yaml --out NEW` reruns a job). Values come, in that
order of precedence, from the defaults, a `--config` YAML and the command line
(rocketrec.run.flags builds the JobConfig; rocketrec.run.config_file reads the YAML).
Each section's dataclass checks its own values; `check(spec)` checks what
needs the spec (sharding: tables and kinds; perfect_teacher's column).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from rocketrec.errors import ConfigError
from rocketrec.model.loss import LossConfig
from rocketrec.model.towers import ModelConfig
from rocketrec.parallel.sharding import check_sharding
from rocketrec.settings import setting, settings_of
from rocketrec.spec import FeatureSpec
from rocketrec.train.train_config import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    spec: str = setting(
        help="feature spec YAML (see feature_specs/README.md)",
        resume=True,
        required=True,
        path=True,
    )
    train: tuple[str, ...] = setting(
        help="training Parquet: one or more files, directories (Hive partitions such as "
        "logs/date=2026-11-26/ too) or globs",
        resume=True,
        required=True,
        path=True,
    )
    out: str = setting(
        help="run directory: metrics, checkpoints, export, plot",
        resume=True,
        required=True,
        path=True,
    )
    val: tuple[str, ...] | None = setting(
        None, "validation Parquet, as --train (metrics per tower)", resume=True, path=True
    )
    no_export: bool = setting(
        False,
        "do not export light.pt at the end of the run",
        resume=True,
        switch=True,
        moved_from=("ray",),
    )

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("--train: give at least one Parquet file, directory or glob")


@dataclass(frozen=True)
class RayConfig:
    workers: int = setting(2, "Ray Train workers (ranks)", resume=True)
    cpus_per_worker: float = setting(
        0.5, "fractional CPUs leave room for Ray's own tasks on small machines", resume=True
    )
    gpus_per_worker: float = setting(0.0, "1 on GPU nodes (nccl)", resume=True)
    max_failures: int = setting(
        2, "restarts of the worker group from the last registered checkpoint", resume=True
    )
    address: str | None = setting(
        None, "Ray address (default: RAY_ADDRESS, else local)", resume=True
    )
    local_cpus: int | None = setting(None, "CPUs of the embedded local Ray", resume=True)
    verbose: bool = setting(
        False, "keep Ray's and the libraries' own log lines", resume=True, switch=True
    )

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("--cpus-per-worker and --gpus-per-worker must be >= 0")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class JobConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig | None = None  # None: one process (`rocketrec train`)
    resume: str | None = None  # continue this run or checkpoint
    run: dict[str, Any] = field(default_factory=dict, compare=False)  # version, commit, command

    def __post_init__(self) -> None:
        if self.loss.mode == "perfect_teacher" and not self.train.teacher_column:
            raise ConfigError(
                "--mode perfect_teacher needs --teacher-column (a probability column)"
            )

    @property
    def workers(self) -> int:
        return self.ray.workers if self.ray is not None else 1

    @property
    def export(self) -> bool:
        """Whether the run ends with light.pt (not for booster_only: no light tower)."""
        return not self.data.no_export and self.loss.mode != "booster_only"

    def check(self, spec: FeatureSpec) -> None:
        """The checks that need the spec; raise ValueError naming the flag."""
        check_sharding(self.train.sharding, spec, self.model.light_private_dim)

    def with_run(self, run: dict[str, Any]) -> JobConfig:
        return replace(self, run=dict(run))

    # -- serialized form: sections of setting-named keys ------------------------
    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        out: dict[str, Any] = {}
        for sec, cls in SECTIONS.items():
            obj = getattr(self, sec)
            if obj is not None:
                out[sec] = {f.name: plain(getattr(obj, f.name)) for f, _ in settings_of(cls)}
        out["train"]["resume"] = self.resume
        if self.run:
            out["run"] = dict(self.run)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        flat: dict[str, Any] = {}
        for sec in SECTIONS:
            flat.update(d.get(sec) or {})
        return job_from_values(flat, ray="ray" in d, run=d.get("run") or {})


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "loss": LossConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "ray": RayConfig,
}


def _pick(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The values of `cls`'s settings (lists as the fields' tuples)."""
    out = {}
    for f, _ in settings_of(cls):
        if f.name in values:
            v = values[f.name]
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


def job_from_values(
    values: dict[str, Any], ray: bool, run: dict[str, Any] | None = None
) -> JobConfig:
    """A JobConfig from setting-named values (parsed flags over a config file, or a
    flattened serialized config). Missing keys take the sections' defaults."""
    v = dict(values)
    if "tensorboard" in v and "no_tensorboard" not in v:  # an older RUN/config.yaml
        v["no_tensorboard"] = not v["tensorboard"]
    return JobConfig(
        data=DataConfig(**_pick(DataConfig, v)),
        model=ModelConfig(**_pick(ModelConfig, v)),
        loss=LossConfig(**_pick(LossConfig, v)),
        train=TrainConfig(**_pick(TrainConfig, v)),
        ray=RayConfig(**_pick(RayConfig, v)) if ray else None,
        resume=v.get("resume"),
        run=dict(run or {}),
    )
