"""Reader throughput: rocketrec's ParquetReader into Batch vs plain pyarrow to numpy.

    python benchmarks/bench_reader.py [--rows 1000000] [--data DIR] [--spec SPEC]

Writes `rocketrec synth` data for the spec (>= 1M rows) unless --data is given,
then measures, in this one process and on one core (torch, pyarrow and the
decode thread limited to one thread each), rows/s of
  A) ParquetReader -> Batch (dense float32, KeyedJaggedTensor, labels, weights)
  B) pyarrow.parquet.ParquetFile.iter_batches decoding the same columns to numpy
     (numeric columns to arrays, list columns to flat values + offsets, string
     columns to numpy object arrays): the baseline.
  C) A with the shuffle buffer on (the training default, seeded permutation of
     `--shuffle-buffer` rows across row groups before batching);
and prints A, B, C, A/B and C/A. Targets: A >= 1M rows/s, A/B >= 0.5, C/A >= 0.9.
Then the start-up cost of many files: `--many-files` (5,000) small files, the
time to construct a reader (footers read once, files closed) and to read them
all, with the most files open at once.
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


def rocketrec_reader(path: str, spec, batch_size: int, shuffle_buffer: int = 0) -> int:
    from rocketrec.data.reader import ParquetReader

    n = 0
    rd = ParquetReader(
        path, spec, batch_size, shuffle=shuffle_buffer > 0, shuffle_buffer=shuffle_buffer
    )
    for b in rd:
        n += len(b)
    return n


def many_files(spec, n_files: int, rows_per_file: int) -> None:
    from rocketrec.data.reader import ParquetReader
    from rocketrec.data.synth import SynthConfig, synth

    with tempfile.TemporaryDirectory(prefix="bench_reader_many_") as d:
        t = time.time()
        synth(
            spec,
            d,
            SynthConfig(rows=n_files * rows_per_file, seed=0, files=n_files, row_group_size=4096),
        )
        print(f"many files: wrote {n_files:,} files in {time.time() - t:.1f}s")
        t = time.perf_counter()
        rd = ParquetReader(d, spec, 1024, rank=0, world_size=2, seed=0)
        t_open = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(len(b) for b in rd)
        t_read = time.perf_counter() - t
        print(
            f"many files: {n_files:,} files: reader start-up {t_open:.2f}s "
            f"({t_open / n_files * 1e3:.2f} ms per footer), rank 0 of 2 read {n:,} rows in "
            f"{t_read:.1f}s, at most {rd.max_files_open_seen} files open at once"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "feature_specs" / "ads_ctr.yaml"))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--data", default=None, help="existing Parquet data for the spec")
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shuffle-buffer", type=int, default=65536)
    ap.add_argument("--many-files", type=int, default=5000, help="0 = skip that part")
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
    best_a = best_b = best_c = 0.0
    pair_ratios = []  # buffer on / off, measured back to back (this machine is noisy)
    for r in range(a.repeats):
        t = time.perf_counter()
        nb = plain_pyarrow(files, columns, a.batch_size)
        rate_b = nb / (time.perf_counter() - t)
        t = time.perf_counter()
        na = rocketrec_reader(path, spec, a.batch_size)
        rate_a = na / (time.perf_counter() - t)
        t = time.perf_counter()
        nc = rocketrec_reader(path, spec, a.batch_size, a.shuffle_buffer)
        rate_c = nc / (time.perf_counter() - t)
        assert na == nb == nc, (na, nb, nc)
        best_a, best_b, best_c = max(best_a, rate_a), max(best_b, rate_b), max(best_c, rate_c)
        pair_ratios.append(rate_c / rate_a)
        print(
            f"run {r + 1}: rocketrec -> Batch {rate_a:,.0f} rows/s | with shuffle buffer "
            f"{rate_c:,.0f} rows/s | plain pyarrow -> numpy {rate_b:,.0f} rows/s"
        )
    print(f"rows: {na:,} ({len(files)} files, batch {a.batch_size}, one core)")
    print(f"rocketrec reader -> Batch:        {best_a:,.0f} rows/s (best of {a.repeats})")
    print(f"plain pyarrow iter_batches->numpy: {best_b:,.0f} rows/s (best of {a.repeats})")
    print(f"rocketrec + shuffle buffer {a.shuffle_buffer:,}: {best_c:,.0f} rows/s")
    print(f"ratio rocketrec / plain pyarrow:   {best_a / best_b:.2f}")
    import statistics

    med = statistics.median(pair_ratios)
    print(
        f"ratio shuffle buffer on / off:     {best_c / best_a:.2f} (best vs best); "
        f"median of back-to-back pairs {med:.2f}"
    )
    print(
        f"targets: >= 1,000,000 rows/s: {'met' if best_a >= 1e6 else 'MISSED'}; "
        f"ratio >= 0.5: {'met' if best_a / best_b >= 0.5 else 'MISSED'}; "
        f"buffer on/off >= 0.9: {'met' if best_c / best_a >= 0.9 else 'MISSED'}"
    )
    if a.many_files:
        many_files(spec, a.many_files, 200)
    if tmp:
        tmp.cleanup()
    os._exit(0)


if __name__ == "__main__":
    main()
