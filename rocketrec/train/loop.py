"""The training loop: one function for 1 or N workers, no Ray imports (Ray wraps it).

    train(spec, train_path, val_path, out_dir, model_cfg, loss_cfg, train_cfg)

Per step: read a batch -> DMP forward (both towers, or what the mode needs)
-> rocket loss -> backward (the tables' fused optimizer updates in backward)
-> clip dense gradients -> dense optimizer step with linear warm-up.
Every `eval_every` steps and at the end: AUC, logloss and calibration of each
tower on the validation set, plus the base-rate logloss; to `metrics.jsonl`
and a console line. A NaN/inf loss (agreed by all ranks) stops the run with
a clear error before the bad step is applied; the last checkpoint stays good.

teacher_student runs two phases over the same data and step budget: `teacher`
(booster_only) then `student` (light tower with BCE + hint against the frozen
booster; tables frozen). Step counts, checkpoints and metrics span both.
Distributed steps must agree, so an epoch has as many steps as the rank with
the fewest batches has (the rest of that epoch's rows on other ranks is
counted in `rows_unused` and not trained on).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.utils import _override_input_dist_forwards
from torchrec.optim.optimizers import in_backward_optimizer_filter

from rocketrec.data.batch import Batch
from rocketrec.data.reader import ParquetReader
from rocketrec.model.loss import LossConfig, PhasePlan, plan_phases
from rocketrec.model.model import ModelConfig, RocketModel
from rocketrec.parallel.sharding import init_distributed, shard_model, sharding_kinds
from rocketrec.parallel.tables import block_views, init_tables, release_free_memory
from rocketrec.spec import FeatureSpec
from rocketrec.train.checkpoint import (
    changed_kind_tables,
    drop_table_state,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    saved_sharding,
)
from rocketrec.train.metrics import base_rate_logloss, tower_metrics
from rocketrec.train.task import RocketTrainTask, TrainingDiverged  # noqa: F401 - re-exported
from rocketrec.train.tracking import Tracker
from rocketrec.train.train_config import TrainConfig  # noqa: F401 - re-exported

for _name in ("torchrec.distributed.planner", "torchrec.distributed"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _DenseStep:
    """What the step path calls `optimizer`: zero_grad, then per-tower clipping of the
    dense gradients, linear warm-up and the dense optimizer's step."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.run.dense_opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        run, cfg = self.run, self.run.cfg
        if cfg.grad_clip > 0:
            # per tower: the light tower's gradients never rescale the booster's
            for group in run.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
        warm = min(1.0, (run.step - run.phase_start + 1) / max(1, cfg.warmup_steps))
        for g in run.dense_opt.param_groups:
            g["lr"] = cfg.dense_lr * warm
        run.dense_opt.step()


class _SparseDistPipeline(TrainPipelineSparseDist):  # type: ignore[misc,type-arg]
    """TrainPipelineSparseDist without the fx rewrite of the model.

    TorchRec's rewrite pipelines a sharded module only when its input is a field
    of the batch; rocketrec bucketizes raw ids inside the model (so training and
    the exported model cannot disagree), so no sharded module qualifies and the
    rewrite would only fail. The pipeline still owns the step (batch
    prefetch and device copy on its own stream, forward, backward, optimizer);
    the sharded modules run their input distribution in the forward.
    """

    def _pipeline_model(self, batch: Any, context: Any, pipelined_forward: Any = None) -> None:
        self._pipelined_modules: list[Any] = []
        self._original_forwards: list[Any] = []
        self._pipelined_postprocs: list[Any] = []
        self.start_sparse_data_dist(batch, context)
        self._original_kjt_dist_forwards = _override_input_dist_forwards([])


class _PlainSteps:
    """The plain step path (no pipeline), with TrainPipelineSparseDist's interface."""

    def __init__(self, fwd: Callable[[Batch], Any], opt: _DenseStep, device: torch.device) -> None:
        self.fwd, self.opt, self.device = fwd, opt, device

    def progress(self, data: Iterator[Batch]) -> Any:
        batch = next(data)  # StopIteration ends the epoch, as for the pipeline
        self.opt.zero_grad()
        loss, out = self.fwd(batch.to(self.device))
        loss.backward()  # fused table optimizer steps here
        self.opt.step()
        return out


Report = Callable[[dict[str, Any], Path | None], None]


_LOG_FILE: list[Path] = []  # RUN/train.log of the current run (rank 0)


def _log(msg: str) -> None:
    """A progress line from rank 0: to the console and to RUN/train.log."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
        if _LOG_FILE:
            with open(_LOG_FILE[0], "a") as f:
                f.write(msg + "\n")


def _eta(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Run:
    """State of one training run (kept off the model: forward stores nothing)."""

    def __init__(
        self,
        spec: FeatureSpec,
        train_path: str | Sequence[str],
        val_path: str | Sequence[str] | None,
        out_dir: str,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        cfg: TrainConfig,
        report: Report | None,
        run_id: str | None = None,
        run_config: dict[str, Any] | None = None,
        resume_from: Path | None = None,
    ) -> None:
        self.spec, self.model_cfg, self.loss_cfg, self.cfg = spec, model_cfg, loss_cfg, cfg
        self.out = Path(out_dir)
        self.report = report
        self.run_id = run_id
        self.run_config = run_config  # the resolved --config + flags, kept in every checkpoint
        self.env = init_distributed()
        self.rank, self.world = self.env.rank, self.env.world_size
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _LOG_FILE[:] = [self.out / "train.log"]
        torch.manual_seed(cfg.seed)
        # Tables are born sharded: built on `meta`, DMP materializes only this rank's
        # shards, then each row gets its plan-independent initial values.
        model = RocketModel(spec, model_cfg, self.env.device, table_device=torch.device("meta"))
        self.model = model
        # Resume: the checkpoint's sharding kinds are the first constraint (the planner
        # picks another kind for a small table at another world size, which would move its
        # optimizer state between the fused and the dense optimizer); --sharding overrides.
        self.saved_kinds = saved_sharding(resume_from) if resume_from is not None else {}
        constraints = {t: {"sharding_type": k} for t, k in self.saved_kinds.items()}
        constraints.update({t: dict(c) for t, c in cfg.sharding.items()})
        self.dmp = shard_model(
            model,
            self.env,
            cfg.sparse_optimizer,
            cfg.sparse_lr,
            constraints,
            # rocket runs both towers every step: every dense parameter gets a gradient
            find_unused_parameters=loss_cfg.mode != "rocket",
        )
        init_tables(self.dmp.state_dict(), cfg.seed)
        release_free_memory()
        # Sharded embeddings need the same batch size on every rank: training drops each
        # rank's short last batch (counted in rows_unused); evaluation pads it instead.
        self.train_reader = ParquetReader(
            train_path,
            spec,
            cfg.batch_size,
            self.rank,
            self.world,
            seed=cfg.seed,
            shuffle=True,
            drop_last=True,
            teacher_column=cfg.teacher_column,
            shuffle_buffer=cfg.shuffle_buffer,
            negative_sample_rate=cfg.negative_sample_rate,
        )
        self.val_reader = (
            ParquetReader(
                val_path, spec, cfg.batch_size, self.rank, self.world, shuffle=False, pad_last=True
            )
            if val_path
            else None
        )
        self.phases: list[PhasePlan] = plan_phases(loss_cfg)  # decided once, used everywhere
        # towers some phase trains: single-tower modes evaluate and export only theirs
        self.trained_towers = {
            t for p in self.phases for t in ("booster", "light") if t in p.trains
        }
        self.step = 0
        self.phase_idx = 0
        self.phase_start = 0
        self.epoch_step = 0
        self.rows_seen = 0
        self.rows_unused = 0
        self.trained_pos = 0  # reader position after the last trained batch of this epoch
        self.loop_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.dense_opt = self._make_dense_opt(self.phases[0])
        booster_ids = {id(p) for p in model.booster.parameters()}
        light_ids = {id(p) for p in model.light.parameters()}
        dense_params = [p for _, p in in_backward_optimizer_filter(self.dmp.named_parameters())]
        self.clip_groups = [
            [p for p in dense_params if id(p) in booster_ids],
            [p for p in dense_params if id(p) in light_ids],
            [p for p in dense_params if id(p) not in booster_ids | light_ids],
        ]
        self.metrics_path = self.out / "metrics.jsonl"
        self.tracker = Tracker(
            self.out,
            cfg.tensorboard,
            cfg.mlflow_uri,
            {"run_config": run_config or {}, "train": asdict(cfg), "loss": asdict(loss_cfg)},
            active=self.rank == 0,
        )

    # -- optimizers --------------------------------------------------------------
    def _trainable_dense(self, plan: PhasePlan) -> list[torch.nn.Parameter]:
        """Dense parameters this phase trains (DP tables included); others stay put."""
        m = self.model
        group = {id(p): "booster" for p in m.booster.parameters()}
        group.update({id(p): "light" for p in m.light.parameters()})
        return [
            p
            for _, p in in_backward_optimizer_filter(self.dmp.named_parameters())
            if p.requires_grad and group.get(id(p), "shared") in plan.trains
        ]

    def _make_dense_opt(self, plan: PhasePlan) -> torch.optim.Optimizer:
        params = self._trainable_dense(plan)
        if self.cfg.dense_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.cfg.dense_lr)
        return torch.optim.Adagrad(params, lr=self.cfg.dense_lr)

    # -- checkpoint ----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Live state for DCP: sharded tensors as block views (bounded chunks on disk)."""
        return {
            "model": self.dmp.state_dict(),
            "sparse_optim": self.dmp.fused_optimizer.state_dict(),
        }

    def warm_start(self, source: str) -> None:
        """Start from another run's weights (see rocketrec.train.warm_start)."""
        from rocketrec.train.warm_start import format_changes, warm_start

        m = self.model
        dense: dict[str, torch.Tensor] = {}
        for prefix, mod in (("booster", m.booster), ("light", m.light), ("bottom", m.bottom)):
            if mod is not None:
                for n, p in mod.state_dict(keep_vars=True).items():
                    dense[f"{prefix}.{n}"] = p.data
        changes = warm_start(self.dmp.state_dict(), dense, source, self.cfg.init_from_allow_shrink)
        release_free_memory()
        _log(format_changes(changes, source))

    def _reader_state(self) -> dict[str, Any]:
        """The reader's state at the last *trained* batch (the step path reads ahead)."""
        return {**self.train_reader.state_dict(), "pos": self.trained_pos}

    def save(self, metrics: dict[str, Any] | None = None) -> Path:
        readers: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(readers, self._reader_state())
        else:
            readers = [self._reader_state()]
        meta: dict[str, Any] = {
            "step": self.step,
            "run_id": self.run_id,
            "phase_idx": self.phase_idx,
            "phase_start": self.phase_start,
            "epoch_step": self.epoch_step,
            "rows_seen": self.rows_seen,
            "rows_unused": self.rows_unused,
            "world_size": self.world,
            "readers": readers,
            "spec": self.spec.to_dict(),
            "model_config": asdict(self.model_cfg),
            "loss_config": asdict(self.loss_cfg),
            "train_config": asdict(self.cfg),
            "metrics": metrics or (self.history[-1] if self.history else {}),
            "sharding": sharding_kinds(self.dmp),  # resume keeps these kinds
            "versions": {"torch": torch.__version__},
            "run_config": self.run_config,
        }
        path = save_checkpoint(
            self.out,
            self.step,
            block_views(self._state()),
            self.dense_opt.state_dict(),
            meta,
            self.cfg.keep_checkpoints,
        )
        release_free_memory()
        _log(f"checkpoint: {path}")
        if self.report is not None:
            self.report({"step": self.step, **(meta["metrics"] or {})}, path)
        return path

    def resume(self, path: Path) -> None:
        state = self._state()
        # A table whose kind changed (--sharding at resume) between data-parallel (state in
        # the dense optimizer) and fused (state in the fused optimizer) cannot take the
        # saved optimizer state: it starts fresh, with one warning line per table.
        fresh = changed_kind_tables(path, state["sparse_optim"], self.saved_kinds)
        now_kinds = sharding_kinds(self.dmp)
        changed = sorted(
            t for t, k in self.saved_kinds.items() if now_kinds.get(t, k) != k
        )  # every table whose kind differs from the checkpoint's (--sharding at resume)
        dp_moved = [
            t for t in changed if "data_parallel" in (self.saved_kinds[t], now_kinds.get(t))
        ]
        to_load = {**state, "sparse_optim": drop_table_state(state["sparse_optim"], fresh)}
        # DCP fills the block views in place, i.e. the live shards: it reads one saved
        # block at a time, never a whole table, whatever world size wrote it.
        dense, meta = load_checkpoint(path, block_views(to_load))
        self.dmp.load_state_dict(state["model"])
        self.dmp.fused_optimizer.load_state_dict(state["sparse_optim"])
        self.step = int(meta["step"])
        self.phase_idx = int(meta["phase_idx"])
        self.phase_start = int(meta["phase_start"])
        self.epoch_step = int(meta["epoch_step"])
        self.rows_seen = int(meta["rows_seen"])
        self.rows_unused = int(meta.get("rows_unused", 0))
        if self.phase_idx >= len(self.phases):
            # a finished run: continue its last phase if the new budget allows more steps
            self.phase_idx = len(self.phases) - 1
            _log(f"resume: {path} is a finished run; continuing it under the new step/epoch budget")
        self.dense_opt = self._make_dense_opt(self.phases[self.phase_idx])
        dense_fresh = False
        try:
            self.dense_opt.load_state_dict(dense)
        except ValueError:  # a data-parallel table came or went (a changed sharding kind)
            dense_fresh = True
        for t in changed:  # one line per table whose kind changed
            extra = ""
            if t in dp_moved:
                extra = "; its optimizer state starts fresh" + (
                    " (so does the towers' dense optimizer state)" if dense_fresh else ""
                )
            _log(
                f"resume: warning: table '{t}' changed sharding kind "
                f"({self.saved_kinds[t]} -> {now_kinds.get(t)}){extra}"
            )
        if dense_fresh and not dp_moved:
            _log(
                "resume: warning: the dense optimizer's parameters changed; its state starts fresh"
            )
        if int(meta["world_size"]) == self.world:
            self.train_reader.load_state_dict(meta["readers"][self.rank])
            self.trained_pos = int(meta["readers"][self.rank]["pos"])
        else:
            # DCP resharded the model; reader positions are per rank and cannot be
            # split again, so the interrupted epoch restarts from its beginning.
            epoch = int(meta["readers"][0]["epoch"])
            self.train_reader.set_epoch(epoch)
            self.epoch_step = 0
            _log(
                f"resume: world size {meta['world_size']} -> {self.world}: epoch {epoch} restarts "
                "from its beginning (its examples before the checkpoint are seen again)"
            )
        release_free_memory()
        _log(f"resumed from {path} at step {self.step}")

    # -- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        if self.val_reader is None:
            return {}
        self.dmp.eval()
        m = self.model
        phase_plan = (m.run_booster, m.run_light, m.light_shared_grad_scale)
        m.set_plan(True, True, 1.0)  # score with both towers; the unused one is dropped below
        self.val_reader.set_epoch(0)
        n = max(self.val_reader.batches_per_epoch(0, r) for r in range(self.world))
        if self.cfg.eval_batches:
            n = min(n, self.cfg.eval_batches)
        ys, ws, zb, zl, gs = [], [], [], [], []
        it = iter(self.val_reader)
        filler = None
        for _ in range(n):
            b = next(it, None)
            if b is None:
                # this rank ran out: run a filler batch so collectives stay in step; drop it
                if filler is None:
                    filler = next(
                        iter(
                            ParquetReader(
                                self.val_reader.path,
                                self.spec,
                                self.cfg.batch_size,
                                shuffle=False,
                                pad_last=True,
                            )
                        )
                    )
                    filler.n_real = 0
                b = filler
            out = self.dmp(b.dense.to(self.env.device), b.sparse.to(self.env.device))
            n_keep = len(b) if b.n_real is None else b.n_real  # padded rows are dropped
            if n_keep:
                ys.append(b.labels[:n_keep].numpy())
                ws.append(
                    b.weights[:n_keep].numpy()
                    if b.weights is not None
                    else np.ones(n_keep, np.float32)
                )
                zb.append(out.booster[:n_keep].float().cpu().numpy())
                zl.append(out.light[:n_keep].float().cpu().numpy())
                if b.group is not None:
                    gs.append(b.group[:n_keep].numpy())
        it.close()  # stop reading: the reader thread ends, the rest is never decoded
        self.dmp.train()
        m.set_plan(*phase_plan)
        local = [np.concatenate(x) if x else np.zeros(0, np.float32) for x in (ys, ws, zb, zl)]
        local.append(np.concatenate(gs) if gs else np.zeros(0, np.int64))
        if self.world > 1:
            # every rank's rows on every rank: a group spread over ranks is scored whole
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, local)
            local = [np.concatenate([g[k] for g in gathered]) for k in range(5)]
        y, w, b_logits, l_logits, groups = local
        # trained on downsampled negatives: p / (p + (1 - p) / r) == sigmoid(logit + log r)
        offset = float(np.log(self.cfg.negative_sample_rate))
        b_logits, l_logits = b_logits + offset, l_logits + offset
        w_arg = w if self.spec.weight_column else None
        g_arg = groups if self.spec.group_column else None
        res: dict[str, Any] = {"step": self.step, "eval_rows": int(len(y))}
        for name, z in (("booster", b_logits), ("light", l_logits)):
            if name not in self.trained_towers:
                continue  # a single-tower mode: the other tower is untrained noise
            for k, v in tower_metrics(y, z, w_arg, g_arg).items():
                res[f"{name}_{k}"] = v
        res["base_logloss"] = base_rate_logloss(y, w_arg)
        res["ctr"] = float(np.average(y, weights=w_arg))
        return res

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.tracker.log(rec)
            if "base_logloss" in rec:
                parts = []
                for t in ("booster", "light"):
                    if f"{t}_auc" not in rec:
                        continue
                    txt = f"{t} auc {rec[f'{t}_auc']:.4f}"
                    if f"{t}_gauc" in rec:
                        txt += f" gauc {rec[f'{t}_gauc']:.4f}"
                    txt += (
                        f" logloss {rec[f'{t}_logloss']:.4f} ne {rec[f'{t}_ne']:.4f}"
                        f" cal {rec[f'{t}_calibration']:.3f}"
                    )
                    parts.append(txt)
                _log(
                    f"eval step {rec['step']}: "
                    + " | ".join(parts)
                    + f" | base logloss {rec['base_logloss']:.4f}"
                )

    # -- the step ------------------------------------------------------------------
    def _batches(self, n: int, positions: deque[int]) -> Generator[Batch, None, None]:
        """At most n batches of the current epoch; records the reader position after each."""
        it = iter(self.train_reader)
        try:
            for _ in range(n):
                b = next(it, None)
                if b is None:
                    return
                positions.append(self.train_reader.state_dict()["pos"])
                yield b
        finally:
            it.close()  # never exhausts the epoch: the loop moves to the next one itself

    def _pipeline(self, plan: PhasePlan) -> Any:
        """The step path: TorchRec's TrainPipelineSparseDist (default) or the plain loop.

        Both run the same train task (forward + loss), backward (the tables' fused
        optimizer updates inside it) and dense update (`_DenseStep`: per-tower clipping,
        warm-up). The pipeline copies batches to the device ahead of time on CUDA; on
        CPU it runs the same steps in order.
        """
        fwd = RocketTrainTask(
            self.dmp, self.loss_cfg, plan, self._weight_norm, self._all_finite, lambda: self.step
        )
        opt = _DenseStep(self)
        if self.cfg.step_path == "plain":
            return _PlainSteps(fwd, opt, self.env.device)
        return _SparseDistPipeline(
            self.dmp,
            opt,  # type: ignore[arg-type]
            self.env.device,
            custom_model_fwd=fwd,  # type: ignore[arg-type]
        )

    def _weight_norm(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """With sample weights on W > 1 workers: the global weight sum / W, the denominator
        of every rank's weighted means. TorchRec and DDP average the gradients over ranks,
        so each rank normalising by its own sum would give a mean of per-rank ratios, not
        the global weighted mean one worker computes on the same global batch
        (docs/results.md section 10)."""
        if w is None or self.world == 1:
            return None
        total = w.detach().sum().reshape(1).clone()
        dist.all_reduce(total)
        return total[0] / self.world

    # -- the loop ------------------------------------------------------------------
    def _all_finite(self, loss: torch.Tensor) -> bool:
        ok = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0])
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() == 1.0)

    def _total_steps(self) -> int:
        """Steps of the whole run (every phase) under the epoch and step budget."""
        per_epoch = self.train_reader.min_batches_all_ranks(0)
        total = 0
        for _ in self.phases:
            n = per_epoch * self.cfg.epochs
            total += min(n, self.cfg.max_steps) if self.cfg.max_steps else n
        return total

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        last_log_t, last_log_rows, last_log_step = t0, self.rows_seen, self.step
        total_steps = self._total_steps()
        final: dict[str, Any] = {}
        while self.phase_idx < len(self.phases):
            plan = self.phases[self.phase_idx]
            phase = plan.phase
            self.model.set_plan(plan.run_booster, plan.run_light, plan.shared_grad_scale)
            while self.train_reader.epoch < cfg.epochs:
                epoch = self.train_reader.epoch
                n_epoch = self.train_reader.min_batches_all_ranks(epoch)
                todo = n_epoch - self.epoch_step
                if cfg.max_steps:
                    todo = min(todo, cfg.max_steps - (self.step - self.phase_start))
                positions: deque[int] = deque()  # reader position after each batch handed out
                pipe = self._pipeline(plan)
                data = self._batches(max(0, todo), positions)
                while True:
                    t_step = time.perf_counter()
                    try:
                        terms, n_rows = pipe.progress(data)
                    except StopIteration:
                        break
                    self.loop_seconds += time.perf_counter() - t_step
                    self.trained_pos = positions.popleft()  # this batch is trained: resume after it
                    self.step += 1
                    self.epoch_step += 1
                    self.rows_seen += n_rows * self.world
                    if cfg.log_every and self.step % cfg.log_every == 0:
                        now = time.time()
                        rate = (self.rows_seen - last_log_rows) / max(now - last_log_t, 1e-9)
                        step_s = (now - last_log_t) / max(1, self.step - last_log_step)
                        last_log_t, last_log_rows, last_log_step = now, self.rows_seen, self.step
                        _log(
                            f"step {self.step}/{total_steps} epoch {epoch} "
                            f"{phase or self.loss_cfg.mode} "
                            + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                            + f" | {rate:,.0f} ex/s | ETA {_eta(step_s * (total_steps - self.step))}"
                        )
                        self._record(
                            {
                                "step": self.step,
                                "phase": phase,
                                **{f"train_{k}": v for k, v in terms.items()},
                                "train_examples_per_s": rate,
                                "train_lr_dense": self.dense_opt.param_groups[0]["lr"]
                                if self.dense_opt.param_groups
                                else cfg.dense_lr,
                                "train_lr_sparse": cfg.sparse_lr,
                            }
                        )
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._record(self.evaluate())
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                data.close()  # stop the reader thread
                if cfg.max_steps and self.step - self.phase_start >= cfg.max_steps:
                    break
                # epoch done: every rank stopped at the common count of batches
                used = n_epoch * cfg.batch_size
                unused = sum(
                    max(0, self.train_reader.rows_for(epoch, r) - used) for r in range(self.world)
                )
                self.rows_unused += unused
                total = self.train_reader.total_rows
                _log(
                    f"epoch {epoch} done at step {self.step}: {total - unused:,} of {total:,} rows "
                    f"trained on, rows_unused {unused:,} (each rank's short last batch)"
                )
                self.train_reader.set_epoch(epoch + 1)
                self.epoch_step = 0
                self.trained_pos = 0
            self.phase_idx += 1
            if self.phase_idx < len(self.phases):
                _log(
                    f"phase {phase} done at step {self.step}; "
                    f"starting {self.phases[self.phase_idx].phase}"
                )
                self.train_reader.set_epoch(0)
                self.epoch_step = 0
                self.trained_pos = 0
                self.phase_start = self.step
                self.dense_opt = self._make_dense_opt(self.phases[self.phase_idx])
        final = self.evaluate()
        final["train_seconds"] = time.time() - t0
        final["step_seconds"] = self.loop_seconds  # forward/backward/update only (no I/O, eval)
        final["steps"] = self.step
        final["rows_seen"] = self.rows_seen
        final["rows_unused"] = self.rows_unused
        self._record(final)
        self.tracker.close()
        path = self.save(final)
        _log(
            f"done: {self.step} steps, {self.rows_seen:,} rows trained on "
            f"({self.rows_unused:,} unused), {final['train_seconds']:.1f}s "
            f"({self.rows_seen / max(self.loop_seconds, 1e-9):,.0f} ex/s in steps); "
            f"checkpoint {path}"
        )
        return final


# TrainConfig fields a resumed run may change: the budget, cadence and step mechanics
RESUME_MAY_CHANGE = (
    "tensorboard",
    "mlflow_uri",
    "epochs",
    "max_steps",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "sharding",
    "step_path",
    "dense_lr",
    "sparse_lr",
    "warmup_steps",
    "grad_clip",
    "init_from",
    "init_from_allow_shrink",
)


class ResumeMismatch(ValueError):
    """--resume with settings that would change the run's model or objective."""


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def check_resume_compatible(
    meta: dict[str, Any],
    spec: FeatureSpec,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    where: str,
) -> None:
    """Refuse, in one line naming the field and both values, a resume that changes the
    spec, the model, the loss or a training setting outside RESUME_MAY_CHANGE."""
    tc_old = {k: v for k, v in meta.get("train_config", {}).items() if k not in RESUME_MAY_CHANGE}
    tc_new = {k: v for k, v in asdict(train_cfg).items() if k not in RESUME_MAY_CHANGE}
    tc_old = {k: v for k, v in tc_old.items() if k in tc_new}  # fields added since: defaults
    for section, old, new in (
        ("spec", meta.get("spec"), spec.to_dict()),
        ("model", meta.get("model_config"), asdict(model_cfg)),
        ("loss", meta.get("loss_config"), asdict(loss_cfg)),
        ("train", tc_old, tc_new),
    ):
        d = _first_difference(json.loads(json.dumps(old)), json.loads(json.dumps(new)), "")
        if d:
            field_, was, now = d
            raise ResumeMismatch(
                f"--resume {where}: {section} setting '{field_}' was {was!r} in the run, "
                f"now {now!r}; resume with the run's settings (epochs, steps and cadence may "
                "change), or start a new run with --out"
            )


def train(
    spec: FeatureSpec,
    train_path: str | Sequence[str],
    val_path: str | Sequence[str] | None,
    out_dir: str,
    model_cfg: ModelConfig | None = None,
    loss_cfg: LossConfig | None = None,
    train_cfg: TrainConfig | None = None,
    resume: str | None = None,
    report: Report | None = None,
    run_id: str | None = None,
    run_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train; returns the final validation metrics. `resume`: a run dir or checkpoint dir."""
    model_cfg, loss_cfg, train_cfg = (
        model_cfg or ModelConfig(),
        loss_cfg or LossConfig(),
        train_cfg or TrainConfig(),
    )
    ck: Path | None = None
    if resume:
        ck = latest_checkpoint(resume)
        if ck is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint found there")
        check_resume_compatible(read_meta(ck), spec, model_cfg, loss_cfg, train_cfg, str(ck))
    run = _Run(
        spec,
        train_path,
        val_path,
        out_dir,
        model_cfg,
        loss_cfg,
        train_cfg,
        report,
        run_id,
        run_config,
        resume_from=ck,
    )
    if run.rank == 0 and run_config is not None:
        from rocketrec.run_config import write_resolved

        write_resolved(Path(out_dir) / "config.yaml", run_config)  # checks passed: record it
    if ck is not None:
        run.resume(ck)
    elif train_cfg.init_from:
        run.warm_start(train_cfg.init_from)
    try:
        return run.run()
    finally:
        sys.stdout.flush()
        if run.env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
