"""The `train` section of a run: TrainConfig, one frozen dataclass checked in __post_init__.

Each field is declared once with its help and whether a --resume may change it
(rocketrec.settings); the flags and YAML keys are generated from it (rocketrec.run.flags).
The loop only reads it. The other sections: ModelConfig (rocketrec.model.towers),
LossConfig (rocketrec.model.loss), DataConfig and RayConfig (rocketrec.train.job).
"""

from __future__ import annotations

from dataclasses import dataclass

from rocketrec.data.reader import DEFAULT_SHUFFLE_BUFFER
from rocketrec.errors import ConfigError
from rocketrec.parallel.sharding import SPARSE_OPTIMIZERS, sharding_arg
from rocketrec.settings import setting


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = setting(1024, "rows per worker per step", resume=False)
    epochs: int = setting(1, "passes over the training data", resume=True)
    max_steps: int = setting(0, "steps per phase at most (0 = the epochs decide)", resume=True)
    dense_optimizer: str = setting(
        "adam", "the towers' optimizer", resume=False, choices=("adam", "adagrad")
    )
    dense_lr: float = setting(1e-3, "the towers' learning rate", resume=True)
    sparse_optimizer: str = setting(
        "rowwise_adagrad", "fused optimizer of the tables", resume=False, choices=SPARSE_OPTIMIZERS
    )
    # chosen on validation data: benchmarks/tune_defaults.py
    sparse_lr: float = setting(0.15, "the tables' learning rate", resume=True)
    warmup_steps: int = setting(50, "linear warm-up of the towers' learning rate", resume=True)
    grad_clip: float = setting(10.0, "max norm of the towers' gradients (0 = off)", resume=True)
    eval_every: int = setting(0, "steps between evaluations (0 = at the end)", resume=True)
    eval_batches: int = setting(0, "validation batches per evaluation (0 = all)", resume=True)
    checkpoint_every: int = setting(0, "steps between checkpoints (0 = at the end)", resume=True)
    keep_checkpoints: int = setting(
        2, "finished checkpoints kept in RUN/checkpoints (the newest ones)", resume=True
    )
    log_every: int = setting(20, "steps between progress lines (0 = none)", resume=True)
    seed: int = setting(0, "seed of the towers' init, shuffling and data order", resume=False)
    sharding: dict[str, dict[str, str]] = setting(
        help="per-table constraints: 'table=row_wise,other=table_wise' or JSON (others: the "
        "planner's choice, never data_parallel; table_wise on one worker)",
        resume=True,
        default_factory=dict,
        parse=sharding_arg,
    )
    teacher_column: str | None = setting(
        None,
        "experiments: probability column used as soft label by --mode perfect_teacher",
        resume=False,
    )
    shuffle_buffer: int = setting(
        DEFAULT_SHUFFLE_BUFFER,
        "rows shuffled together across row groups before batching (0 = off)",
        resume=False,
    )
    step_path: str = setting(
        "pipeline",
        "pipeline: TorchRec's TrainPipelineSparseDist (one path for CPU and CUDA); plain: "
        "forward/backward/step in order",
        resume=True,
        choices=("pipeline", "plain"),
    )
    init_from: str | None = setting(
        None,
        "start a new run from another run's weights (tables by name; grown tables keep their "
        "rows; towers where shapes match)",
        resume=True,
        path=True,
    )
    init_from_allow_shrink: bool = setting(
        False,
        "with --init-from: allow tables with fewer rows (keep the first) or another dim (fresh)",
        resume=True,
        switch=True,
    )
    negative_sample_rate: float = setting(
        1.0,
        "train on every click and this share of non-clicks (0 < r <= 1); evaluation and the "
        "exported model correct the probabilities for it (logit + log r)",
        resume=False,
    )
    no_tensorboard: bool = setting(
        False,
        "do not write TensorBoard event files under RUN/tb/ (written by default)",
        resume=True,
        switch=True,
    )
    mlflow_uri: str | None = setting(
        None,
        "also log metrics, the config and the exported model to MLflow (e.g. "
        "file:///shared/mlruns or http://mlflow:5000); needs the mlflow package",
        resume=True,
    )
    follow: bool = setting(
        False,
        "near-line: train on each complete partition under --train (a directory with a "
        "_SUCCESS file) once, in arrival order, as they appear; each scored before it is "
        "trained on (docs/near_line.md)",
        resume=True,
        switch=True,
    )
    follow_poll: float = setting(
        5.0, "with --follow: seconds between looks for partitions", resume=True
    )
    follow_verify: bool = setting(
        True,
        "with --follow: decode every row group of a new partition (each worker its share) "
        "before scoring or training it, so a partition with corrupt data pages is "
        "quarantined instead of stopping the job (off: one read less per partition)",
        resume=True,
    )
    until_idle: float = setting(
        0.0,
        "with --follow: stop, after a checkpoint, once no new partition has arrived for this "
        "many seconds (0 = never; SIGTERM also stops after a checkpoint)",
        resume=True,
    )
    publish_every: int = setting(
        0,
        "with --follow: publish the light tower every N partitions (rocketrec publish: "
        "parity and NE gates, RUN/published/LATEST; 0 = never)",
        resume=True,
    )
    publish_minutes: float = setting(
        0.0,
        "with --follow: also publish after a partition once this many minutes have passed "
        "since the last publish (0 = only --publish-every)",
        resume=True,
    )
    max_ne_regression: float = setting(
        0.01,
        "publishing: refuse a model whose NE on the newest partition is worse than the "
        "published one's by more than this (relative)",
        resume=True,
    )
    keep_published: int = setting(3, "publishing: candidates kept on disk", resume=True)

    def __post_init__(self) -> None:
        for k in ("batch_size", "epochs"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.step_path not in ("pipeline", "plain"):
            raise ConfigError(f"step_path must be pipeline or plain, got {self.step_path!r}")
        if not 0.0 < self.negative_sample_rate <= 1.0:
            raise ConfigError(
                f"negative_sample_rate must be in (0, 1], got {self.negative_sample_rate}"
            )
        if (self.publish_every or self.publish_minutes) and not self.follow:
            raise ConfigError(
                "publish_every / publish_minutes publish while following (--follow); to "
                "publish a finished run: rocketrec publish RUN --data NEWEST"
            )
        if self.follow_poll <= 0 or self.keep_published < 1:
            raise ConfigError("follow_poll must be > 0 and keep_published >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for k in (
            "publish_every",
            "publish_minutes",
            "until_idle",
            "max_ne_regression",
            "max_steps",
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "shuffle_buffer",
        ):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.dense_optimizer not in ("adam", "adagrad"):
            raise ConfigError(
                f"dense_optimizer must be adam or adagrad, got {self.dense_optimizer!r}"
            )
        if not (self.dense_lr > 0 and self.sparse_lr > 0):
            raise ConfigError("learning rates must be > 0")
