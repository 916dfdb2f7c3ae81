"""Reader throughput: rocketrec's ParquetReader into Batch vs plain pyarrow to numpy.

    python benchmarks/bench_reader.py [--rows 1000000] [--data DIR] [--spec SPEC]

Writes `rocketrec synth` data for the spec (>= 1M rows) unless --data is given,
then measures, in this one process and on one core (torch, pyarrow and the
decode thread limited to one thread each), rows/s of
  A) ParquetReader -> Batch (dense float32, KeyedJaggedTensor, labels, weights)
  B) pyarrow.parquet.ParquetFile.iter_batches decoding the same columns to numpy
     (numeric columns to arrays, list columns to flat values + offsets, string
     columns to numpy object arrays): the baseline.
and prints both and A/B. Targets: A >= 1M rows/s, A/B >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_pyarrow(files: list[str], columns: list[str], batch_size: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
            for col in rb.columns:
                if pa.types.is_list(col.type):
                    col.flatten().to_numpy(zero_copy_only=False)
                    col.offsets.to_numpy()
                else:
                    col.to_numpy(zero_copy_only=False)
            n += rb.num_rows
    return n


def rocketrec_reader(path: str, spec, batch_size: int) -> int:
    from rocketrec.data.reader import ParquetReader

    n = 0
    for b in ParquetReader(path, spec, batch_size, shuffle=False):
        n += len(b)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "feature_specs" / "ads_ctr.yaml"))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--data", default=None, help="existing Parquet data for the spec")
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    from rocketrec.data.reader import list_parquet_files
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.spec import load_spec

    spec = load_spec(a.spec)
    tmp = None
    path = a.data
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_reader_")
        path = tmp.name
        t = time.time()
        synth(spec, path, SynthConfig(rows=a.rows, seed=0, files=4, row_group_size=65536))
        dt = time.time() - t
        print(f"synth: {a.rows:,} rows in {dt:.1f}s ({a.rows / dt * 60 / 1e6:.1f}M rows/min)")
    _, files = list_parquet_files(path)
    columns = spec.columns()
    best_a = best_b = 0.0
    for r in range(a.repeats):
        t = time.perf_counter()
        nb = plain_pyarrow(files, columns, a.batch_size)
        rate_b = nb / (time.perf_counter() - t)
        t = time.perf_counter()
        na = rocketrec_reader(path, spec, a.batch_size)
        rate_a = na / (time.perf_counter() - t)
        assert na == nb, (na, nb)
        best_a, best_b = max(best_a, rate_a), max(best_b, rate_b)
        print(
            f"run {r + 1}: rocketrec -> Batch {rate_a:,.0f} rows/s | plain pyarrow -> numpy {rate_b:,.0f} rows/s"
        )
    print(f"rows: {na:,} ({len(files)} files, batch {a.batch_size}, one core)")
    print(f"rocketrec reader -> Batch:        {best_a:,.0f} rows/s (best of {a.repeats})")
    print(f"plain pyarrow iter_batches->numpy: {best_b:,.0f} rows/s (best of {a.repeats})")
    print(f"ratio rocketrec / plain pyarrow:   {best_a / best_b:.2f}")
    print(
        f"targets: >= 1,000,000 rows/s: {'met' if best_a >= 1e6 else 'MISSED'}; "
        f"ratio >= 0.5: {'met' if best_a / best_b >= 0.5 else 'MISSED'}"
    )
    if tmp:
        tmp.cleanup()
    os._exit(0)


if __name__ == "__main__":
    main()
