"""Schema evolution: daily partitions whose column types differ (widened ints, float32 vs
float64, string/large_string/dictionary, list variants, all-null columns, extra columns)
read as one dataset; unsafe differences and bad values named by file and column."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketrec.data.batch import DataError, decode_table
from rocketrec.data.reader import ParquetReader


def _base(tiny_data) -> pa.Table:
    import glob

    return pq.read_table(sorted(glob.glob(tiny_data["train"] + "/*.parquet"))[0])


def _set(t: pa.Table, col: str, arr) -> pa.Table:  # type: ignore[no-untyped-def]
    return t.set_column(t.column_names.index(col), col, arr)


def _drifted(tmp_path, base: pa.Table) -> list[pa.Table]:
    """Three days of the same rows' schema: day 2 widens and retypes, day 3 adds a column,
    dictionary-encodes strings and stores an all-null dense column without a type."""
    n = base.num_rows // 3
    d1 = base.slice(0, n)
    d1 = _set(d1, "y", d1["y"].cast(pa.int8()))
    d2 = base.slice(n, n)
    d2 = _set(d2, "y", d2["y"].cast(pa.int64()))
    small = pa.array(
        [None if v is None else abs(v) % 100_000 for v in d2["user"].to_pylist()], pa.int32()
    )
    d2 = _set(d2, "user", small)
    d2 = _set(d2, "price", d2["price"].cast(pa.float64()))
    d2 = _set(d2, "ad", d2["ad"].cast(pa.large_string()))
    tags = [None if v is None else [x % 1000 for x in v] for v in d2["tags"].to_pylist()]
    d2 = _set(d2, "tags", pa.array(tags, pa.large_list(pa.int32())))
    d3 = base.slice(2 * n)
    d3 = _set(d3, "ad", d3["ad"].dictionary_encode())
    d3 = _set(d3, "raw", pa.nulls(d3.num_rows))  # all null, stored as type null
    d3 = d3.append_column("new_col", pa.array(np.arange(d3.num_rows)))
    for i, t in enumerate([d1, d2, d3]):
        p = tmp_path / f"date=2026-11-2{i}" / "part-0.parquet"
        p.parent.mkdir(parents=True)
        pq.write_table(t, p, row_group_size=500)
    return [d1, d2, d3]


def _all_rows(reader) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    out: dict[str, list] = {"y": [], "dense": [], "vals": [], "lens": []}
    for b in reader:
        out["y"].append(b.labels.numpy())
        out["dense"].append(b.dense.numpy())
        out["vals"].append(b.sparse.values().numpy())
        out["lens"].append(b.sparse.lengths().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_drifted_partitions_read_as_one(tmp_path, tiny_spec, tiny_data):
    days = _drifted(tmp_path, _base(tiny_data))
    r = ParquetReader(str(tmp_path), tiny_spec, batch_size=700, shuffle=False, drop_last=False)
    notes = "; ".join(r.schema_notes)
    for col in ("y:", "user:", "price:", "ad:", "tags:"):
        assert col in notes, notes
    assert "new_col" not in notes and "raw: float (2 files), null (1 file)" in notes
    got = _all_rows(r)
    # reference: each day decoded alone with its own schema (the null column as NaN)
    want = [decode_table(d, tiny_spec, "d") for d in days[:2]]
    y = np.concatenate([w.labels for w in want] + [days[2]["y"].to_numpy().astype("f4")])
    np.testing.assert_array_equal(got["y"], y)
    assert got["y"].shape[0] == sum(d.num_rows for d in days)
    raw_col = [f.name for f in [*tiny_spec.dense, *tiny_spec.bucket_features]].index("raw")
    n3 = days[2].num_rows
    assert np.isnan(got["dense"][-n3:, raw_col]).all()  # null -> missing -> fill in the model
    d12 = np.concatenate([w.dense for w in want])
    np.testing.assert_allclose(got["dense"][: len(d12)], d12, rtol=0, atol=0)


def test_drifted_partitions_train_and_validate(tmp_path, tiny_spec, tiny_spec_path, tiny_data):
    _drifted(tmp_path / "logs", _base(tiny_data))
    out = subprocess.run(
        [sys.executable, "-m", "rocketrec.cli", "validate", str(tiny_spec_path), "--data",
         str(tmp_path / "logs")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    summary = [x for x in lines if "differ in type across files" in x]
    assert len(summary) == 1 and "y: int8 (2 files), int64 (1 file)" in summary[0], lines
    assert lines[-1].startswith("ok: ") and "rows decode" in lines[-1]


@pytest.mark.parametrize(
    "col,arr_fn,needle",
    [
        ("user", lambda t: t["user"].cast(pa.string()), "column 'user'"),
        ("tags", lambda t: pa.array([1] * t.num_rows, pa.int64()), "column 'tags'"),
        ("y", lambda t: pa.array([2] * t.num_rows, pa.int64()), "label column 'y'"),
        ("y", lambda t: pa.array([None] * t.num_rows, pa.int64()), "null"),
        # a number column stored as strings in one file: refused, never parsed
        ("price", lambda t: t["price"].cast(pa.string()), "column 'price'"),
        ("score", lambda t: t["score"].cast(pa.string()), "column 'score'"),
    ],
)
def test_unsafe_difference_or_bad_values_name_the_file(tmp_path, tiny_spec, tiny_data, col, arr_fn, needle):  # fmt: skip
    base = _base(tiny_data)
    good, bad = base.slice(0, 1000), base.slice(1000, 1000)
    bad = _set(bad, col, arr_fn(bad))
    for i, t in enumerate([good, bad]):
        pq.write_table(t, tmp_path / f"day{i}.parquet", row_group_size=500)
    with pytest.raises(DataError) as e:
        r = ParquetReader(str(tmp_path), tiny_spec, batch_size=256, shuffle=True, drop_last=False)
        for _ in r:
            pass
    msg = str(e.value)
    assert "day1.parquet" in msg and needle in msg and "\n" not in msg, msg
