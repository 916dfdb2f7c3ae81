"""One training run's live state, built once per run (every rank):

    t = Trainer(spec, model_cfg, loss_cfg, cfg, out, train_reader, val_reader)
    t.resume(path) | t.warm_start(source)      optional
    rocketrec.train.loop.run(t)                the step and phase loop

Holds the model (tables born sharded: built on `meta`, DMP materializes this
rank's shards, each row gets its plan-independent initial values), the dense
optimizer, the readers, the run's counters (`Progress`) and its log (`RunLog`).

Its own state, `state_dict()` / `load_state_dict()`: the counters, every rank's
reader position and RNG state, kept in each checkpoint's meta.json; `save()` and
`resume()` add the model and both optimizers through rocketrec.checkpoint (the
files, the resume rules). Evaluation is rocketrec.train.validation, warm start
rocketrec.checkpoint.warm_start.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.optim.optimizers import in_backward_optimizer_filter

from rocketrec.checkpoint import resume as resume_rules
from rocketrec.checkpoint.files import latest_checkpoint
from rocketrec.checkpoint.meta import checkpoint_meta, saved_trainer_state
from rocketrec.checkpoint.warm_start import warm_start_model
from rocketrec.data.reader import ParquetReader
from rocketrec.model.init import init_tables
from rocketrec.model.loss import LossConfig, PhasePlan, plan_phases, trained_towers
from rocketrec.model.model import RocketModel
from rocketrec.model.towers import ModelConfig
from rocketrec.parallel.dist import init_distributed
from rocketrec.parallel.sharding import shard_model, sharding_kinds
from rocketrec.parallel.tables import release_free_memory
from rocketrec.spec import FeatureSpec
from rocketrec.train.runlog import RunLog
from rocketrec.train.steps import DenseStep
from rocketrec.train.task import DivergenceGuard, RocketTrainTask
from rocketrec.train.tracking import Tracker
from rocketrec.train.train_config import TrainConfig
from rocketrec.train.validation import evaluate

for _name in ("torchrec.distributed.planner", "torchrec.distributed"):
    logging.getLogger(_name).setLevel(logging.ERROR)

Report = Callable[[dict[str, Any], Path | None], None]


@dataclass
class Progress:
    """The run's counters (saved in every checkpoint, restored on resume)."""

    step: int = 0
    phase_idx: int = 0
    phase_start: int = 0  # step at which the current phase began
    epoch_step: int = 0  # steps done in the current epoch
    rows_seen: int = 0
    rows_unused: int = 0  # rows of finished epochs no step trained on
    loop_seconds: float = 0.0  # time in steps (forward/backward/update) only


def _rng_state(device: torch.device) -> dict[str, str]:
    """This process's torch RNG states (CPU, and the device's when it is CUDA), as text."""
    out = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device).numpy().tobytes()
        out["cuda"] = base64.b64encode(cuda).decode()
    return out


def _set_rng_state(state: dict[str, str], device: torch.device) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(tensor(state["cuda"]), device)


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order (collective)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train_reader(spec: FeatureSpec, path: Any, cfg: TrainConfig, rank: int, world: int) -> Any:
    """The training reader of a run. Sharded embeddings need the same batch size on every
    rank: each rank's short last batch is dropped (counted in rows_unused); with --follow
    it is padded instead, its padding weighed 0 (no row of a partition left out)."""
    return ParquetReader(
        path,
        spec,
        cfg.batch_size,
        rank,
        world,
        seed=cfg.seed,
        shuffle=True,
        drop_last=True,
        teacher_column=cfg.teacher_column,
        shuffle_buffer=cfg.shuffle_buffer,
        negative_sample_rate=cfg.negative_sample_rate,
        pad_final=cfg.follow,
    )


def val_reader(spec: FeatureSpec, path: Any, cfg: TrainConfig, rank: int, world: int) -> Any:
    """The validation reader: its short last batch is padded, never dropped."""
    if not path:
        return None
    return ParquetReader(path, spec, cfg.batch_size, rank, world, shuffle=False, pad_last=True)


# Diagnostics: with this set to a directory, every rank appends the raw ids of the
# spec's first sparse feature of each batch it trained (one line per batch) to
# DIR/rank<r>-<pid>.txt: with a unique row id as that feature, a test (or an engineer)
# counts which rows a run trained, across restarts and worker counts.
TRACE_ENV = "ROCKETREC_TRACE_TRAINED_IDS"


class _IdTrace:
    def __init__(self, d: Path, spec: FeatureSpec, rank: int) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"rank{rank}-{os.getpid()}.txt"
        self.key = spec.id_features[0].name

    def __call__(self, batch: Any) -> None:
        ids = batch.sparse[self.key].values()
        n = getattr(batch, "n_real", None)
        ids = ids[:n] if n is not None else ids
        with open(self.path, "a") as f:
            f.write(" ".join(str(int(x)) for x in ids.tolist()) + "\n")


class Trainer:
    def __init__(
        self,
        spec: FeatureSpec,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        cfg: TrainConfig,
        out: str | Path,
        train_data: Any,
        val_data: Any = None,
        report: Report | None = None,
        run_id: str | None = None,
        run_config: dict[str, Any] | None = None,
        resume_from: Path | None = None,
    ) -> None:
        """train_data / val_data: Parquet paths, or readers made for this rank."""
        self.spec, self.model_cfg, self.loss_cfg, self.cfg = spec, model_cfg, loss_cfg, cfg
        self.out, self.report, self.run_id = Path(out), report, run_id
        self.run_config = run_config  # the resolved job config, kept in every checkpoint
        self.env = init_distributed()
        self.rank, self.world = self.env.rank, self.env.world_size
        params = {"run_config": run_config or {}, "train": asdict(cfg), "loss": asdict(loss_cfg)}
        tracker = Tracker(self.out, not cfg.no_tensorboard, cfg.mlflow_uri, params, self.rank == 0)
        self.log = RunLog(self.out, self.rank == 0, tracker)
        torch.manual_seed(cfg.seed)
        # Resume: the checkpoint's sharding kinds are the first constraint (see resume.py)
        self.saved_kinds = resume_rules.saved_sharding(resume_from) if resume_from else {}
        self.model, self.dmp = self._build()
        # --follow: the partitions done, the one in progress, those quarantined
        self.follow_state: dict[str, Any] = {"done": [], "current": None, "quarantined": []}
        reader = (
            train_data
            if isinstance(train_data, ParquetReader) or train_data is None
            else train_reader(spec, train_data, cfg, self.rank, self.world)
        )
        # None only with --follow, until the follow loop opens a partition
        self.train_reader: ParquetReader = reader  # type: ignore[assignment]
        self.val_reader = (
            val_data
            if isinstance(val_data, ParquetReader)
            else val_reader(spec, val_data, cfg, self.rank, self.world)
        )
        trace_dir = os.environ.get(TRACE_ENV)
        self.trace = _IdTrace(Path(trace_dir), spec, self.rank) if trace_dir else None
        if self.train_reader is not None:
            self.train_reader.trace = self.trace
        self.phases: list[PhasePlan] = plan_phases(loss_cfg)  # decided once, used everywhere
        self.trained_towers = set(trained_towers(loss_cfg))  # the others: not evaluated
        self.progress = Progress()
        self.guard = DivergenceGuard(self.env.device)  # every step's loss finite? (on device)
        self.dense_opt = self.make_dense_opt(self.phases[0])

    def _build(self) -> tuple[RocketModel, Any]:
        model = RocketModel(
            self.spec, self.model_cfg, self.env.device, table_device=torch.device("meta")
        )
        dmp = shard_model(
            model,
            self.env,
            self.cfg.sparse_optimizer,
            self.cfg.sparse_lr,
            {t: dict(c) for t, c in self.cfg.sharding.items()},
            # rocket runs both towers every step: every dense parameter gets a gradient
            find_unused_parameters=self.loss_cfg.mode != "rocket",
            allowed=resume_rules.allowed_kinds(self.saved_kinds, self.world),
        )
        init_tables(dmp.state_dict(), self.cfg.seed)
        release_free_memory()
        return model, dmp

    # -- the step's parts ----------------------------------------------------------
    def _groups(self) -> dict[int, str]:
        group = {id(p): "booster" for p in self.model.booster.parameters()}
        group.update({id(p): "light" for p in self.model.light.parameters()})
        return group

    def _dense_params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in in_backward_optimizer_filter(self.dmp.named_parameters())]

    def make_dense_opt(self, plan: PhasePlan) -> torch.optim.Optimizer:
        """The dense optimizer of a phase: the parameters it trains (DP tables included)."""
        group = self._groups()
        params = [
            p
            for p in self._dense_params()
            if p.requires_grad and group.get(id(p), "shared") in plan.trains
        ]
        # fused kernels keep the step counters on the device: no host sync per parameter
        # (Adagrad's fused kernel is CPU-only; on CUDA it runs the foreach path)
        cpu = self.env.device.type == "cpu"
        if self.cfg.dense_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.cfg.dense_lr, fused=bool(params))
        return torch.optim.Adagrad(params, lr=self.cfg.dense_lr, fused=cpu and bool(params))

    def dense_step(self) -> DenseStep:
        group = self._groups()
        params = self._dense_params()
        # clipped per tower: the light tower's gradients never rescale the booster's
        clip_groups = [
            [p for p in params if group.get(id(p), "shared") == g]
            for g in ("booster", "light", "shared")
        ]
        p = self.progress
        return DenseStep(self.dense_opt, clip_groups, self.cfg, lambda: p.step - p.phase_start)

    def task(self, plan: PhasePlan) -> RocketTrainTask:
        return RocketTrainTask(
            self.dmp, self.loss_cfg, plan, self.world, lambda: self.progress.step, self.guard
        )

    # -- around the loop -----------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        return evaluate(
            self.dmp,
            self.val_reader,
            self.trained_towers,
            self.progress.step,
            self.env.device,
            self.cfg.eval_batches,
            self.cfg.negative_sample_rate,
        )

    def check_finite(self) -> None:
        """Stop (TrainingDiverged) if a step's loss since the last check was not finite."""
        self.guard.check(
            self.world, f"at step {self.progress.step}", lambda: latest_checkpoint(self.out)
        )

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's own state beyond the model and optimizers (collective: every rank
        calls it): its counters, every rank's reader position at the last trained batch,
        and every rank's RNG state. JSON-ready."""
        reader = self.train_reader.trained_state() if self.train_reader is not None else None
        state = {
            "world_size": self.world,
            "progress": asdict(self.progress),
            "readers": _gather(reader, self.world),
            "rng": _gather(_rng_state(self.env.device), self.world),
        }
        if self.cfg.follow:
            state["follow"] = self.follow_state
        return state

    def stop_requested(self) -> bool:
        """Whether the loop should stop after this step (the follow loop sets it: SIGTERM)."""
        return False

    def load_state_dict(self, state: dict[str, Any], where: str = "the checkpoint") -> None:
        """Continue from `state` (a state_dict(), of this or another world size). The same
        world size continues each reader exactly; another one shares the rows of the
        interrupted epoch that no old rank trained (each row of the epoch once); a reader
        state of an older stream restarts its epoch. RNG states are restored rank by rank
        at the same world size; at another one each rank keeps its seeded state."""
        p = self.progress
        saved = state.get("progress", {})
        for f in fields(Progress):
            if f.name in saved:
                setattr(p, f.name, type(getattr(p, f.name))(saved[f.name]))
        if p.phase_idx >= len(self.phases):
            # a finished run: continue its last phase if the new budget allows more steps
            p.phase_idx = len(self.phases) - 1
            self.log.line(
                f"resume: {where} is a finished run; continuing it under the new step/epoch budget"
            )
        saved_world = int(state["world_size"])
        rng = state.get("rng")
        if rng and saved_world == self.world:
            _set_rng_state(rng[self.rank], self.env.device)
        if self.cfg.follow:
            self.follow_state = state.get("follow") or self.follow_state
            if self.follow_state["current"] is None:  # between partitions: no position
                return
        self._load_readers(state["readers"], saved_world, where)

    def _load_readers(self, readers: list[dict[str, Any]], saved_world: int, where: str) -> None:
        p = self.progress
        epoch = int(readers[0]["epoch"])
        if not all(ParquetReader.continuable(st) for st in readers):
            # a checkpoint of an older rocketrec: its positions are of another stream
            self.train_reader.next_epoch(epoch)
            p.epoch_step = 0
            self.log.line(
                f"resume: {where} holds reader positions of an older rocketrec: epoch {epoch} "
                "restarts from its beginning (its examples before the checkpoint are seen again)"
            )
        elif saved_world == self.world:
            self.train_reader.load_state_dict(readers[self.rank])
        else:
            # DCP resharded the model; the rows no old rank trained are shared again
            left = self.train_reader.load_states(readers)
            p.epoch_step = 0
            self.log.line(
                f"resume: world size {saved_world} -> {self.world}: epoch {epoch} continues "
                f"with its {left:,} untrained rows shared by {self.world} worker(s) (each row "
                "of the epoch is trained once)"
            )

    def save(self, metrics: dict[str, Any] | None = None) -> Path:
        """Checkpoint the run (collective): model, both optimizers, state_dict() and the job
        config in meta.json. Reports it to Ray when asked to."""
        self.check_finite()  # never save a NaN step
        config = dict(self.run_config or {})
        for sec, live in (("model", self.model_cfg), ("loss", self.loss_cfg), ("train", self.cfg)):
            config[sec] = {**(config.get(sec) or {}), **asdict(live)}
        metrics = metrics or self.log.last()
        meta = checkpoint_meta(
            self.state_dict(), self.run_id, self.spec, config, metrics, sharding_kinds(self.dmp)
        )
        path = resume_rules.save_model(
            self.out, self.progress.step, self.dmp, self.dense_opt.state_dict(), meta,
            self.cfg.keep_checkpoints,
        )  # fmt: skip
        self.log.line(f"checkpoint: {path}")
        if self.report is not None:
            self.report({"step": self.progress.step, **(metrics or {})}, path)
        return path

    def resume(self, path: Path) -> None:
        """Load the model, both optimizers and state_dict() from checkpoint `path`."""
        loaded = resume_rules.load_model(path, self.dmp, self.saved_kinds)
        self.load_state_dict(saved_trainer_state(loaded.meta), str(path))
        self.dense_opt = self.make_dense_opt(self.phases[self.progress.phase_idx])
        dense_fresh = False
        try:
            self.dense_opt.load_state_dict(loaded.dense_optim)
        except ValueError:  # a data-parallel table came or went (a changed sharding kind)
            dense_fresh = True
        for line in loaded.lines(self.world, dense_fresh):
            self.log.line(line)
        release_free_memory()
        self.log.line(f"resumed from {path} at step {self.progress.step}")

    def warm_start(self, source: str) -> None:
        """Start from another run's weights (see rocketrec.checkpoint.warm_start)."""
        allow = self.cfg.init_from_allow_shrink
        self.log.line(warm_start_model(self.model, self.dmp.state_dict(), source, allow))
        release_free_memory()
