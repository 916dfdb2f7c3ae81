"""Synthetic ad logs for any feature spec, with a hidden ground truth that has interactions.

Design (what makes the data useful for comparing a deep and a shallow tower):

- Two latent row variables, a user segment `seg` (64 values) and an ad
  category `cat` (32 values). Sparse features alternate between the user side
  (ids clustered by `seg`) and the ad side (clustered by `cat`): with
  probability `cluster_p` an id is drawn from its latent value's slice of the
  vocabulary, otherwise from the whole vocabulary. Ids are Zipf-skewed, so ids
  correlate with each other through the latents (ad -> campaign -> category,
  user -> segment), and visible features can proxy hidden ones.
- Every (feature, id) has a hidden weight and an 8-d hidden vector. The true
  logit is  b + 0.5 * first-order + 1.4 * sum of <H_f, H_g> over random feature
  pairs + 0.8 * A[seg, cat]  (each term standardised), with `b` set for the
  target click rate. A shallow model sees the first-order part; crosses need
  depth. List features pool their elements' weights and vectors (mean).
- Dense features are log-normal with a mean that depends on the latents.
- Some nulls (2% of scalar ids, 5% of dense values), some empty lists.
- `true_ctr_column`: optionally write the true click probability (for Bayes
  ceilings and perfect-teacher baselines); it is never a feature.
- `seed` draws the rows; `world_seed` fixes the hidden model, so train and
  validation sets drawn with different seeds share one ground truth.
- `label_noise`: flip this fraction of labels (after drawing them).
- `partitions`, `drift`: near-line logs, one `hour=KKKK/` directory per partition
  with a `_SUCCESS` marker; the click model drifts `drift` radians per partition
  towards a second hidden world (`Generator.at`), so that a model trained on old
  partitions loses AUC on new ones.

Behaviour sequences (sparse `kind: sequence`) are list columns written NEWEST FIRST
(position 0 is the most recent item; a model keeps the first `max_len`); how histories
are drawn and enter the click: `histories.py`. The teacher column: `generator.py`.

`synth(..., report=SynthReport())` also measures, over the rows written, the Bayes
AUC (true probability vs the written labels), the Bayes AUC of the true logit
without the sequence terms, and the teacher's AUC on its non-null rows (binned in
logit space: exact to ~1e-5).

Deterministic for a seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rocketrec.data.synth.generator import Generator
from rocketrec.data.synth.report import SynthReport
from rocketrec.data.synth.world import SynthConfig
from rocketrec.spec import FeatureSpec

__all__ = ["Generator", "SynthConfig", "SynthReport", "heldout_table", "partition_name", "synth"]


def synth(
    spec: FeatureSpec,
    out_dir: str,
    cfg: SynthConfig,
    progress: bool = False,
    report: SynthReport | None = None,
) -> list[str]:
    """Write cfg.rows rows as cfg.files Parquet files under out_dir; returns the paths.
    With cfg.partitions = N: N partition directories `out_dir/hour=KKKK/` (K from
    cfg.first_partition), cfg.rows rows each, the click model drifted k * cfg.drift
    radians in partition k (`Generator.at`), each directory's `_SUCCESS` written last.
    `report`, if given, is filled with the AUCs of what was written."""
    gen = Generator(spec, cfg)  # checks the config before anything is written
    os.makedirs(out_dir, exist_ok=True)
    if report is not None:
        report.teacher_column, report.teacher_noise = spec.teacher_column, cfg.teacher_noise
    if not cfg.partitions:
        return _write_files(gen, out_dir, cfg, (cfg.seed,), progress, report)
    paths = []
    for k in range(cfg.first_partition, cfg.first_partition + cfg.partitions):
        d = os.path.join(out_dir, partition_name(k))
        os.makedirs(d, exist_ok=True)
        paths += _write_files(gen.at(k * cfg.drift), d, cfg, (cfg.seed, k), progress, report)
        open(os.path.join(d, "_SUCCESS"), "w").close()
        if progress:
            print(f"synth: partition {partition_name(k)} complete", flush=True)
    return paths


def partition_name(k: int) -> str:
    return f"hour={k:04d}"


def _write_files(
    gen: Generator,
    out_dir: str,
    cfg: SynthConfig,
    key: tuple[int, ...],
    progress: bool,
    report: SynthReport | None,
) -> list[str]:
    """cfg.rows rows as cfg.files files under out_dir, rows drawn from seeds (*key, file,
    first row): atomic per file (a hidden temporary renamed)."""
    paths = []
    per_file = [
        cfg.rows // cfg.files + (1 if i < cfg.rows % cfg.files else 0) for i in range(cfg.files)
    ]
    chunk = max(cfg.row_group_size, 1)
    done = 0
    for i, nrows in enumerate(per_file):
        path = os.path.join(out_dir, f"part-{i:05d}.parquet")
        tmp = os.path.join(out_dir, f".part-{i:05d}.parquet.tmp")  # hidden: readers skip it
        writer: pq.ParquetWriter | None = None
        for start in range(0, max(nrows, 1), chunk):
            n = min(chunk, nrows - start)
            t, truth = gen._draw(np.random.default_rng([*key, i, start]), max(n, 1))
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            if n > 0:
                writer.write_table(t, row_group_size=chunk)
                done += n
                if report is not None:
                    report.add(truth)
            if progress:
                print(f"synth: {done:,}/{cfg.rows:,} rows", flush=True)
        assert writer is not None
        writer.close()
        os.replace(tmp, path)
        paths.append(path)
    return paths


def heldout_table(spec: FeatureSpec, data: str | list[str] | None, rows: int) -> pa.Table:
    """Rows to check an export on: the first `rows` of `data`'s first row group, or
    synthetic rows of the spec when no data is given."""
    if data:
        from rocketrec.data.files import list_parquet_files

        fs, files = list_parquet_files(data)
        pf = pq.ParquetFile(fs.open_input_file(files[0]))
        return pf.read_row_group(0, columns=spec.columns()).slice(0, rows)
    gen = Generator(spec, SynthConfig(rows=rows, seed=12345))
    return gen.table(np.random.default_rng(12345), rows)
