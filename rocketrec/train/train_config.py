"""The `train` section of a run: TrainConfig, one frozen dataclass checked in __post_init__.

Built once from flags and/or a run config file (rocketrec.config, rocketrec.run_config);
the loop only reads it. The other sections: ModelConfig (rocketrec.model.towers),
LossConfig (rocketrec.model.loss); data paths and Ray's scaling stay flags of the
entry points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rocketrec.data.reader import DEFAULT_SHUFFLE_BUFFER


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 1024
    epochs: int = 1
    max_steps: int = 0  # per phase; 0 = the epochs decide
    dense_optimizer: str = "adam"  # adam | adagrad
    dense_lr: float = 1e-3
    sparse_optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | sgd (fused)
    sparse_lr: float = 0.15  # chosen on validation data: benchmarks/tune_defaults.py
    warmup_steps: int = 50
    grad_clip: float = 10.0  # max norm of dense gradients; 0 = off
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation set
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 20
    seed: int = 0
    sharding: dict[str, dict[str, str]] = field(default_factory=dict)  # table -> constraints
    teacher_column: str | None = None  # probability column for mode perfect_teacher
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # rows permuted together; 0 = off
    step_path: str = "pipeline"  # pipeline (TorchRec TrainPipelineSparseDist) | plain
    init_from: str | None = None  # warm start from this run or checkpoint (new run)
    init_from_allow_shrink: bool = False
    # keep every click and this share of non-clicks (training data only); evaluation and
    # the exported model correct the probabilities: logit + log(rate)
    negative_sample_rate: float = 1.0
    tensorboard: bool = True  # event files under RUN/tb/ (rank 0)
    mlflow_uri: str | None = None  # MLflow tracking URI (rank 0); None = off

    def __post_init__(self) -> None:
        for k in ("batch_size", "epochs"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.step_path not in ("pipeline", "plain"):
            raise ValueError(f"step_path must be pipeline or plain, got {self.step_path!r}")
        if not 0.0 < self.negative_sample_rate <= 1.0:
            raise ValueError(
                f"negative_sample_rate must be in (0, 1], got {self.negative_sample_rate}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for k in (
            "max_steps",
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "shuffle_buffer",
        ):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.dense_optimizer not in ("adam", "adagrad"):
            raise ValueError(
                f"dense_optimizer must be adam or adagrad, got {self.dense_optimizer!r}"
            )
        if not (self.dense_lr > 0 and self.sparse_lr > 0):
            raise ValueError("learning rates must be > 0")
