"""Offline evaluation of any model on any logs, and runs side by side (`offline.py`,
`report.py`, `compare.py`).

`evaluate_model(model, data)` scores Parquet logs with

- an exported `light.pt` (through the same TorchScript module a server loads,
  its manifest naming the inputs: the light tower only), or
- a run directory / checkpoint (both towers; the unsharded model on the CPU, one
  process, no Ray; its tables are read chunk by chunk from the checkpoint's
  files into one copy of the model, never more than the checkpoint holds),

streaming the data (pyarrow, one batch at a time; a progress line with rows/s
and ETA). Memory is bounded: up to `exact_rows` rows (default 5M) each row's
score, label, weight and group are kept for exact metrics (~26 bytes a row,
~150 for a moment while the metrics sort them); past that, per-tower
histograms of the logit (65,536 bins) give AUC and the deciles, streamed sums
give logloss, NE and calibration exactly, and GAUC is not computed
(docs/daily_loop.md has the figures). It reports per tower: rows, AUC, GAUC (spec
`group` or `--group`), logloss, NE, calibration, and calibration by
predicted-probability decile. The metrics are `rocketrec.train.metrics`, the
training run's own, on calibrated probabilities (a negative-sampled model:
`sigmoid(logit + log rate)`), so the figures equal the run's evaluation on the
same rows.

`compare_runs(runs, data)` (`compare.py`) puts runs side by side: their settings, steps and
examples/s, and per-tower metrics from each run's last evaluation or, with
`data`, freshly evaluated on the same rows.
"""

from rocketrec.evaluation.compare import compare_runs, format_comparison
from rocketrec.evaluation.offline import evaluate_model
from rocketrec.evaluation.report import format_report, reliability_plot

__all__ = [
    "compare_runs",
    "evaluate_model",
    "format_comparison",
    "format_report",
    "reliability_plot",
]
