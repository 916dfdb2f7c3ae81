"""One job config: every setting of a training job, typed, frozen and checked once.

    JobConfig(data, model, loss, train, ray)      ray is None for `rocketrec train`
    job.to_dict() / JobConfig.from_dict(d)       the serialized form: RUN/config.yaml,
                                                 and what Ray workers receive

Sections and keys are the flags' groups and names (`--batch-size` is
`train.batch_size`), so the serialized form is also a run config file
(`--config RUN/config.yaml --out NEW` reruns a job). Values come, in that
order of precedence, from the defaults, a `--config` YAML and the command line
(rocketrec.config builds the JobConfig; rocketrec.run_config reads the YAML).
Each section's dataclass checks its own values; `check(spec)` checks what
needs the spec (sharding: tables and kinds; perfect_teacher's column).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from rocketrec.model.loss import LossConfig
from rocketrec.model.model import ModelConfig
from rocketrec.parallel.sharding import check_sharding
from rocketrec.spec import FeatureSpec
from rocketrec.train.train_config import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    spec: str
    train: tuple[str, ...]
    out: str
    val: tuple[str, ...] | None = None
    no_export: bool = False  # the run directory gets light.pt unless set

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("--train: give at least one Parquet file, directory or glob")


@dataclass(frozen=True)
class RayConfig:
    workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    address: str | None = None
    local_cpus: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("--cpus-per-worker and --gpus-per-worker must be >= 0")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")


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
            raise ValueError("--mode perfect_teacher needs --teacher-column (a probability column)")

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

    # -- serialized form: sections of flag-named keys ----------------------------
    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        train = {k: plain(v) for k, v in asdict(self.train).items() if k != "tensorboard"}
        train.update(no_tensorboard=not self.train.tensorboard, resume=self.resume)
        out: dict[str, Any] = {
            "data": {k: plain(v) for k, v in asdict(self.data).items()},
            "loss": asdict(self.loss),
            "model": {k: plain(v) for k, v in asdict(self.model).items()},
            "train": train,
        }
        if self.ray is not None:
            out["ray"] = asdict(self.ray)
        if self.run:
            out["run"] = dict(self.run)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        flat: dict[str, Any] = {}
        for sec in ("data", "loss", "model", "train", "ray"):
            flat.update(d.get(sec) or {})
        return job_from_values(flat, ray="ray" in d, run=d.get("run") or {})


def _pick(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    return {f.name: values[f.name] for f in fields(cls) if f.name in values}


def job_from_values(
    values: dict[str, Any], ray: bool, run: dict[str, Any] | None = None
) -> JobConfig:
    """A JobConfig from flag-named values (argparse's namespace, or a flattened
    serialized config). Missing keys take the sections' defaults."""
    v = dict(values)
    for k in ("booster_mlp", "light_mlp", "shared_bottom", "attention_mlp", "train", "val"):
        if v.get(k) is not None:
            v[k] = tuple(v[k])
    train = _pick(TrainConfig, v)
    train["tensorboard"] = not v.get("no_tensorboard", False)
    train["sharding"] = dict(v.get("sharding") or {})
    return JobConfig(
        data=DataConfig(**_pick(DataConfig, v)),
        model=ModelConfig(**_pick(ModelConfig, v)),
        loss=LossConfig(**_pick(LossConfig, v)),
        train=TrainConfig(**train),
        ray=RayConfig(**_pick(RayConfig, v)) if ray else None,
        resume=v.get("resume"),
        run=dict(run or {}),
    )
