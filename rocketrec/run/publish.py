"""Publishing a run's light tower to servers, gated (`rocketrec publish`).

    RUN/published/
        000000120/light.pt      an exported candidate (step 120 of the run)
        000000120/REFUSED       why it was not published (one line), if it was not
        LATEST                  the published one's directory name; replaced atomically
        log.jsonl               one record per attempt: step, published or refused, why,
                                the candidate's and the published model's NE on the data

`publish_run(run, data)` exports the run's newest checkpoint into
`RUN/published/<step>/` (the export's parity gate: nothing is written if the file's
scores differ from the training model's), evaluates it and the currently published model
on the same rows (`data`: the newest traffic), and publishes it only if its light-tower
NE is no worse than the published model's by more than `max_ne_regression` (relative;
default 1%). Publishing is one atomic rename of `LATEST` (written to a temporary file,
fsynced, renamed): a server watching the directory (`rocketrec_predict --watch`,
`rocketrec::PredictorWatch`, deploy/README.md) sees either the old name or the new one.
A refused model stays on disk with its reason. Older candidates are pruned to the newest
`keep` (never the published one).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rocketrec.checkpoint.files import atomic_write_text, latest_checkpoint, read_meta
from rocketrec.errors import CheckpointNotFound, ExportError, UserError
from rocketrec.run.run_dir import RunDir

LATEST, REFUSED, LOG = "LATEST", "REFUSED", "log.jsonl"


def published_dir(run: str | Path) -> Path:
    return RunDir(run).root / "published"


def current(pub: Path) -> Path | None:
    """The published model's file (what LATEST names), or None."""
    latest = pub / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    for fname in ("light.pt", "light.pt2"):
        if (pub / name / fname).is_file():
            return pub / name / fname
    return None


def _light_ne(model: Path, data: Any, rows: int | None) -> float:
    from rocketrec.evaluation.offline import evaluate_model

    rep = evaluate_model(model, data, rows=rows, quiet=True)
    return float(rep["towers"]["light"]["ne"])


def _prune(pub: Path, keep: int) -> list[str]:
    live = (pub / LATEST).read_text().strip() if (pub / LATEST).is_file() else None
    dirs = sorted(d for d in pub.iterdir() if d.is_dir() and d.name.isdigit())
    gone = []
    for d in dirs[:-keep] if keep > 0 else []:
        if d.name != live:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


def publish_run(
    run: str | Path,
    data: Any,
    max_ne_regression: float = 0.01,
    keep: int = 3,
    fmt: str = "torchscript",
    rows: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Export, gate and (maybe) publish the run's newest checkpoint (module docstring).
    Returns the attempt's record (also appended to RUN/published/log.jsonl)."""
    from rocketrec.serving.export import export_checkpoint

    if not max_ne_regression >= 0:
        raise UserError(f"--max-ne-regression must be >= 0, got {max_ne_regression}")
    ck = latest_checkpoint(run)
    if ck is None:
        raise CheckpointNotFound(f"{run}: no complete checkpoint to publish")
    step = int(read_meta(ck)["step"])
    pub = published_dir(run)
    cand = pub / f"{step:09d}"
    live = current(pub)
    if live is not None and live.parent == cand:  # never rewrite what servers load
        rec0 = {"step": step, "model": str(live), "time": time.time(), "published": True,
                "reason": f"step {step} is already published"}  # fmt: skip
        log(f"publish: {rec0['reason']} ({live})")
        with open(pub / LOG, "a") as f:
            f.write(json.dumps(rec0) + "\n")
        return rec0
    cand.mkdir(parents=True, exist_ok=True)
    (cand / REFUSED).unlink(missing_ok=True)
    path = cand / ("light.pt2" if fmt == "aoti" else "light.pt")
    rec: dict[str, Any] = {"step": step, "model": str(path), "time": time.time()}
    t0 = time.perf_counter()
    try:
        exp = export_checkpoint(ck, path, data=data if isinstance(data, str) else None, fmt=fmt)
        rec["parity_max_abs_diff"] = exp["max_abs_diff"]
    except ExportError as e:
        rec.update(published=False, reason=f"export refused: {e}")
    if "reason" not in rec:
        rec["ne"] = _light_ne(path, data, rows)
        old = current(pub)
        rec["published_ne"] = _light_ne(old, data, rows) if old is not None else None
        rec["previous"] = str(old) if old is not None else None
        limit = None if old is None else rec["published_ne"] * (1 + max_ne_regression)
        if limit is not None and not rec["ne"] <= limit:
            rec.update(
                published=False,
                reason=f"NE {rec['ne']:.5f} on the newest data is worse than the published "
                f"model's {rec['published_ne']:.5f} by more than {max_ne_regression:.1%}",
            )
        else:
            atomic_write_text(pub / LATEST, cand.name + "\n")
            rec["published"] = True
    rec["seconds"] = time.perf_counter() - t0
    if not rec["published"]:
        (cand / REFUSED).write_text(rec["reason"] + "\n")
        log(f"publish: step {step} refused: {rec['reason']}")
    else:
        log(
            f"publish: step {step} published ({path}; NE {rec['ne']:.5f}"
            + (f", was {rec['published_ne']:.5f})" if rec.get("published_ne") else ")")
        )
    rec["pruned"] = _prune(pub, keep)
    with open(pub / LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def publisher(max_ne_regression: float, keep: int) -> Any:
    """The follow loop's `publish(run_dir, partition, log)` (rocketrec.train.follow)."""

    def publish(run: Path, partition: Path, log: Any) -> dict[str, Any]:
        return publish_run(run, str(partition), max_ne_regression, keep, log=log)

    return publish
