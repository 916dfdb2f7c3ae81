"""Hashing, synthetic logs, Arrow -> Batch, and the Parquet reader."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rocketrec.data.batch import DataError, arrow_to_batch, decode_table
from rocketrec.data.reader import ParquetReader
from rocketrec.data.synth import SynthConfig, synth
from rocketrec.errors import CheckpointError, ConfigError
from rocketrec.spec import spec_from_dict
from rocketrec.spec.hashing import TEST_VECTORS, fnv1a64, hash_strings

# -- hashing -----------------------------------------------------------------------


def test_hash_test_vectors():
    for s, v in TEST_VECTORS:
        assert fnv1a64(s) == v
    # published FNV-1a 64 vectors (as unsigned)
    assert fnv1a64("a") % (1 << 64) == 0xAF63DC4C8601EC8C
    assert fnv1a64("foobar") % (1 << 64) == 0x85944171F73967E8


def test_vectorised_hash_matches_scalar():
    rng = random.Random(0)
    alphabet = "abcXYZ0129:_-éü€😀 "
    strings = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)
    ]
    strings += [s for s, _ in TEST_VECTORS]
    got = hash_strings(pa.array(strings))
    assert got.dtype == np.int64
    assert got.tolist() == [fnv1a64(s) for s in strings]
    # dictionary-encoded and sliced inputs give the same ids
    assert hash_strings(pa.array(strings).dictionary_encode()).tolist() == got.tolist()
    assert hash_strings(pa.array(strings).slice(7, 100)).tolist() == got[7:107].tolist()


# -- synth ---------------------------------------------------------------------------


def _digest(d: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        h.update(name.encode())
        h.update(open(os.path.join(d, name), "rb").read())
    return h.hexdigest()


def test_synth_deterministic_and_valid(tmp_path, tiny_spec):
    cfg = SynthConfig(rows=5000, seed=3, files=2, row_group_size=1000, true_ctr_column="p_true")
    synth(tiny_spec, str(tmp_path / "a"), cfg)
    synth(tiny_spec, str(tmp_path / "b"), cfg)
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))
    synth(
        tiny_spec, str(tmp_path / "c"), SynthConfig(rows=5000, seed=4, files=2, row_group_size=1000)
    )
    assert _digest(str(tmp_path / "a")) != _digest(str(tmp_path / "c"))
    t = pq.read_table(tmp_path / "a")
    assert t.num_rows == 5000
    ctr = t["y"].to_numpy().mean()
    assert 0.01 <= ctr <= 0.10, ctr
    tags = t["tags"]
    assert pc_count(tags, 0) > 0, "some empty lists"
    assert t["user"].null_count > 0 and t["price"].null_count > 0
    p = t["p_true"].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    # it reads back through the one Arrow -> Batch path
    r = ParquetReader(str(tmp_path / "a"), tiny_spec, 1024, shuffle=False)
    assert sum(len(b) for b in r) == 5000


def pc_count(list_col, length: int) -> int:
    import pyarrow.compute as pc

    lens = pc.fill_null(pc.list_value_length(list_col), 0).to_numpy()
    return int((lens == length).sum())


def test_synth_labels_depend_on_interactions(tmp_path, tiny_spec):
    """The true CTR must not be (nearly) a function of first-order terms alone: AUC of p_true
    well above what a shuffled label gets, so a deep tower has something to learn."""
    from rocketrec.train.metrics import auc

    synth(tiny_spec, str(tmp_path), SynthConfig(rows=20000, seed=5, true_ctr_column="p"))
    t = pq.read_table(tmp_path)
    assert auc(t["y"].to_numpy(), t["p"].to_numpy()) > 0.70


def test_synth_partitions_drift_the_click_model(tmp_path, tiny_spec):
    """--partitions N --drift D: N complete partition directories; the same ids in every
    one, while the true click probability moves away from partition 0's world: on the
    same rows, the drifted world's logit correlates cos(k D) with the first one's, and
    partition 0's true p scores later partitions' labels worse and worse."""
    from rocketrec.data.partitions import complete_partitions
    from rocketrec.data.synth import Generator
    from rocketrec.train.metrics import auc

    cfg = SynthConfig(rows=20000, seed=3, partitions=3, drift=0.6, true_ctr_column="p")
    synth(tiny_spec, str(tmp_path), cfg)
    parts = complete_partitions(tmp_path)
    assert [p.name for p in parts] == ["hour=0000", "hour=0001", "hour=0002"]
    gen = Generator(tiny_spec, cfg)
    rng = np.random.default_rng(0)
    z0 = gen._logit_parts(rng, 5000).z
    corr = []
    for k in (1, 2):
        zk = gen.at(k * cfg.drift)._logit_parts(np.random.default_rng(0), 5000).z
        corr.append(float(np.corrcoef(z0, zk)[0, 1]))
    assert 0.6 < corr[0] < 0.95 and corr[1] < corr[0] - 0.1, corr
    first = gen.at(0.0)
    aucs = []
    for k, p in enumerate(parts):  # partition 0's truth on each partition's labels
        t = pq.read_table(p.path)
        n = t.num_rows
        k_rows = first._draw(np.random.default_rng([cfg.seed, k, 0, 0]), n)[0]
        aucs.append(auc(t["y"].to_numpy(), k_rows["p"].to_numpy()))
        assert t.column_names == k_rows.column_names
    assert aucs[0] > aucs[1] > aucs[2] and aucs[0] - aucs[2] > 0.05, aucs
    with pytest.raises(ConfigError, match="drift needs partitions"):
        synth(tiny_spec, str(tmp_path / "x"), SynthConfig(rows=10, drift=0.1))


# -- Arrow -> Batch --------------------------------------------------------------------

SPEC = spec_from_dict(
    {
        "version": 1,
        "label": {"column": "y"},
        "tables": [{"name": "t", "rows": 10, "dim": 4}, {"name": "s", "rows": 7, "dim": 4}],
        "sparse": [
            {"name": "a", "column": "a", "table": "t"},
            {"name": "l", "column": "l", "table": "t", "kind": "list", "max_ids": 2},
            {"name": "s", "column": "s", "table": "s", "dtype": "string", "kind": "list"},
        ],
        "dense": [{"name": "x", "column": "x", "fill": 3.0, "transform": "log1p"}],
    },
    "mem.yaml",
)


def _table(**over):
    cols = {
        "y": pa.array([0, 1, 0], pa.int8()),
        "a": pa.array([5, None, -3], pa.int64()),
        "l": pa.array([[1, 2, 3], None, []], pa.list_(pa.int64())),
        "s": pa.array([["u"], [None, "v"], None], pa.list_(pa.string())),
        "x": pa.array([0.0, None, -5.0], pa.float32()),
    }
    cols.update(over)
    return pa.table(cols)


def test_arrow_to_batch_layout():
    b = arrow_to_batch(_table(), SPEC, "t.parquet")
    assert b.sparse.keys() == ["a", "l", "s"]
    # raw inputs, feature-major: a (null -> empty), l (null/empty -> 0; not truncated
    # here), s (null element dropped); dense raw with NaN for null
    assert b.sparse.lengths().tolist() == [1, 0, 1, 3, 0, 0, 1, 1, 0]
    assert b.sparse.values().tolist() == [5, -3, 1, 2, 3, fnv1a64("u"), fnv1a64("v")]
    assert b.dense.dtype == torch.float32 and b.dense.shape == (3, 1)
    assert b.dense[0, 0] == 0.0 and torch.isnan(b.dense[1, 0]) and b.dense[2, 0] == -5.0
    assert b.labels.tolist() == [0.0, 1.0, 0.0] and b.weights is None
    # the model's preprocessing: max_ids 2, id mod rows, fill 3.0 then log1p(max(x, 0))
    from rocketrec.model.preprocess import Preprocess

    rows, lengths, dense = Preprocess(SPEC)(b.sparse.values(), b.sparse.lengths(), b.dense)
    assert lengths.tolist() == [1, 0, 1, 2, 0, 0, 1, 1, 0]
    assert rows.tolist() == [5, 7, 1, 2, fnv1a64("u") % 7, fnv1a64("v") % 7]
    assert torch.allclose(
        dense[:, 0], torch.tensor([0.0, float(np.log1p(3.0)), 0.0], dtype=torch.float32)
    )


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"a": pa.array([1.5, 2.0, 3.0])}, "column 'a'"),
        ({"s": pa.array([[1], [2], [3]], pa.list_(pa.int64()))}, "column 's'"),
        ({"l": pa.array([1, 2, 3], pa.int64())}, "not a list"),
        ({"y": pa.array([0, 2, 1], pa.int8())}, "outside {0, 1}"),
        ({"y": pa.array([0, None, 1], pa.int8())}, "null"),
        ({"y": pa.array(["0", "1", "0"])}, "label column 'y'"),
        ({"x": pa.array([1.0, float("inf"), 2.0])}, "infinite"),
        ({"x": pa.array([1.0, 1e300, 2.0])}, "beyond float32"),
        ({"x": pa.array(["a", "b", "c"])}, "dense feature 'x'"),
    ],
)
def test_bad_data_errors_name_file_and_column(over, needle):
    with pytest.raises(DataError) as e:
        decode_table(_table(**over), SPEC, "logs/part-0.parquet")
    assert "logs/part-0.parquet" in str(e.value) and needle in str(e.value), str(e.value)


def test_missing_column_error():
    with pytest.raises(DataError, match=r"f\.parquet: column 'x' \(dense feature 'x'\) not found"):
        decode_table(_table().drop_columns(["x"]), SPEC, "f.parquet")


# -- reader ------------------------------------------------------------------------------

RID_SPEC = spec_from_dict(
    {
        "version": 1,
        "label": {"column": "y"},
        "tables": [{"name": "t", "rows": 1000, "dim": 4}],
        "sparse": [{"name": "rid", "column": "rid", "table": "t"}],
    }
)


def _write_rid_files(d, sizes=((0, 137, 40), (137, 500, 64), (500, 503, 10), (503, 900, 50))):
    """Files of consecutive row ids with uneven row groups; rid is a unique row id."""
    os.makedirs(d, exist_ok=True)
    for i, (lo, hi, rg) in enumerate(sizes):
        t = pa.table(
            {"y": pa.array(np.arange(lo, hi) % 2, pa.int8()), "rid": pa.array(np.arange(lo, hi))}
        )
        pq.write_table(t, os.path.join(d, f"part-{i}.parquet"), row_group_size=rg)
    return 900


def _ids(batches):
    return [int(x) for b in batches for x in b.sparse.values().tolist()]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_every_row_once(tmp_path, world):
    n = _write_rid_files(tmp_path)
    for epoch in range(2):
        seen = []
        for r in range(world):
            rd = ParquetReader(str(tmp_path), RID_SPEC, 64, rank=r, world_size=world, seed=7)
            rd.set_epoch(epoch)
            seen += _ids(rd)
        assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("world,batch", [(1, 64), (2, 64), (3, 100), (2, 450), (7, 64)])
def test_pad_final_trains_every_row_with_equal_steps(tmp_path, world, batch):
    """pad_final (--follow): every rank yields steps_all_ranks() batches of the full
    size, each with n_real; the real rows (the first n_real of each) are every row
    once; a rank with one batch less ends with a filler (n_real 0)."""
    n = _write_rid_files(tmp_path)
    seen, fillers = [], 0
    for r in range(world):
        rd = ParquetReader(str(tmp_path), RID_SPEC, batch, rank=r, world_size=world,
                           seed=3, drop_last=True, pad_final=True)  # fmt: skip
        bs = list(rd)
        assert len(bs) == rd.steps_all_ranks(0) and all(len(b) == batch for b in bs)
        assert all(b.n_real is not None for b in bs) and rd.rows_unused(0, len(bs)) == 0
        for b in bs:
            ids = b.sparse.values().tolist()
            seen += ids[: b.n_real]
            fillers += b.n_real == 0
    assert sorted(seen) == list(range(n))
    # 900 rows on 7 ranks: 4 ranks of 129 rows (3 batches), 3 of 128 (2 + a filler)
    assert fillers == (3 if world == 7 else 0)


def test_epochs_reshuffle_and_batches_fixed(tmp_path):
    _write_rid_files(tmp_path)
    rd = ParquetReader(str(tmp_path), RID_SPEC, 64, seed=1)
    e0 = list(rd)
    e1 = list(rd)
    assert rd.epoch == 2
    assert _ids(e0) != _ids(e1) and sorted(_ids(e0)) == sorted(_ids(e1))
    assert all(len(b) == 64 for b in e0[:-1]) and len(e0[-1]) == 900 % 64
    dl = ParquetReader(str(tmp_path), RID_SPEC, 64, seed=1, drop_last=True)
    assert all(len(b) == 64 for b in dl) and dl.batches_per_epoch() == 900 // 64


@pytest.mark.parametrize("k", [0, 1, 4, 7])
def test_resume_yields_exactly_the_rest(tmp_path, k):
    _write_rid_files(tmp_path)
    full = _ids(ParquetReader(str(tmp_path), RID_SPEC, 50, rank=1, world_size=2, seed=3))
    rd = ParquetReader(str(tmp_path), RID_SPEC, 50, rank=1, world_size=2, seed=3)
    it = iter(rd)
    head = [next(it) for _ in range(k)]
    state = rd.state_dict()
    it.close()
    again = ParquetReader(str(tmp_path), RID_SPEC, 50, rank=1, world_size=2, seed=3)
    again.load_state_dict(state)
    assert _ids(head) + _ids(again) == full


def test_petastorm_style_dataset_metadata_ignored(tmp_path):
    """petastorm/Spark write plain Parquet plus _SUCCESS, _metadata, _common_metadata, .crc."""
    d = tmp_path / "ds"
    n = _write_rid_files(d)
    (d / "_SUCCESS").write_text("")
    (d / ".part-0.parquet.crc").write_bytes(b"\x00crc")
    schema = pq.read_schema(d / "part-0.parquet")
    pq.write_metadata(schema, d / "_common_metadata")
    pq.write_metadata(schema, d / "_metadata")
    (d / "empty.parquet").write_bytes(b"")  # empty file: skipped
    pq.write_table(
        pa.table({"y": pa.array([], pa.int8()), "rid": pa.array([], pa.int64())}),
        d / "zero.parquet",
    )
    rd = ParquetReader(str(d), RID_SPEC, 100, shuffle=False)
    assert sorted(_ids(rd)) == list(range(n))
    glob_rd = ParquetReader(str(d / "part-*.parquet"), RID_SPEC, 100, shuffle=False)
    assert sorted(_ids(glob_rd)) == list(range(n))


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ParquetReader(str(tmp_path / "nope"), RID_SPEC, 10)
    (tmp_path / "junk.parquet").write_text("not parquet at all")
    with pytest.raises(DataError, match="junk.parquet"):
        ParquetReader(str(tmp_path), RID_SPEC, 10)
    os.remove(tmp_path / "junk.parquet")
    pq.write_table(
        pa.table({"y": pa.array([0], pa.int8()), "rid": pa.array([0.5])}), tmp_path / "f.parquet"
    )
    with pytest.raises(DataError, match=r"f\.parquet.*column 'rid'"):
        ParquetReader(str(tmp_path), RID_SPEC, 10)


def test_bad_values_surface_from_background_thread(tmp_path):
    pq.write_table(
        pa.table({"y": pa.array([0, 5], pa.int8()), "rid": pa.array([1, 2])}),
        tmp_path / "f.parquet",
    )
    rd = ParquetReader(str(tmp_path), RID_SPEC, 10)
    with pytest.raises(DataError, match="outside"):
        list(rd)


def test_pad_last_repeats_rows_and_counts_real(tmp_path):
    _write_rid_files(tmp_path)
    rd = ParquetReader(str(tmp_path), RID_SPEC, 64, shuffle=False, pad_last=True)
    batches = list(rd)
    assert all(len(b) == 64 for b in batches)
    assert batches[-1].n_real == 900 % 64 and all(b.n_real is None for b in batches[:-1])
    real = _ids(batches[:-1]) + batches[-1].sparse.values().tolist()[: batches[-1].n_real]
    assert sorted(real) == list(range(900))


# -- balanced ranks, shuffle buffer, many files, several paths ---------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_balanced_by_rows(tmp_path, world):
    n = _write_rid_files(tmp_path)
    b = 32
    for epoch in range(3):
        rows = []
        seen = []
        for r in range(world):
            rd = ParquetReader(str(tmp_path), RID_SPEC, b, rank=r, world_size=world, seed=epoch)
            rd.set_epoch(epoch)
            rows.append(rd.rows_for(epoch))
            seen += _ids(rd)
        assert sum(rows) == n and max(rows) - min(rows) <= 1
        assert sorted(seen) == list(range(n))
        common = min(r // b for r in rows)
        assert sum(r - common * b for r in rows) <= world * b  # rows_unused bound


def test_shuffle_buffer_mixes_rows_across_row_groups(tmp_path):
    # one time-sorted file: without the buffer a batch is a contiguous run of rows
    pq.write_table(
        pa.table({"y": pa.array(np.arange(2000) % 2, pa.int8()), "rid": pa.array(np.arange(2000))}),
        tmp_path / "sorted.parquet",
        row_group_size=100,
    )
    plain = list(ParquetReader(str(tmp_path), RID_SPEC, 50, seed=1, shuffle_buffer=0))
    assert all(max(_ids([b])) - min(_ids([b])) < 100 for b in plain)  # inside one row group
    mixed = list(ParquetReader(str(tmp_path), RID_SPEC, 50, seed=1, shuffle_buffer=1000))
    spans = [max(_ids([b])) - min(_ids([b])) for b in mixed]
    assert min(spans) > 300  # rows of several row groups in every batch
    assert sorted(_ids(mixed)) == list(range(2000))
    # bounded: the rows of a batch come from the 10 row groups of one 1000-row window
    assert all(len({i // 100 for i in _ids([b])}) <= 10 for b in mixed)
    # deterministic for a seed, different for another
    again = list(ParquetReader(str(tmp_path), RID_SPEC, 50, seed=1, shuffle_buffer=1000))
    other = list(ParquetReader(str(tmp_path), RID_SPEC, 50, seed=2, shuffle_buffer=1000))
    assert _ids(again) == _ids(mixed) and _ids(other) != _ids(mixed)


@pytest.mark.parametrize("k", [1, 3, 5, 6, 11])
def test_resume_inside_the_shuffle_buffer(tmp_path, k):
    _write_rid_files(tmp_path)
    kw = dict(rank=1, world_size=2, seed=3, shuffle_buffer=128, drop_last=True)
    full = _ids(ParquetReader(str(tmp_path), RID_SPEC, 30, **kw))
    rd = ParquetReader(str(tmp_path), RID_SPEC, 30, **kw)
    it = iter(rd)
    head = [next(it) for _ in range(k)]
    state = rd.state_dict()
    it.close()
    assert state["pos"] == 30 * k and state["pos"] % 128 != 0 or k == 0
    again = ParquetReader(str(tmp_path), RID_SPEC, 30, **kw)
    again.load_state_dict(state)
    assert _ids(head) + _ids(again) == full


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousands_of_files_open_lazily(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    n_files, per = 2100, 7
    for i in range(n_files):
        lo = i * per
        pq.write_table(
            pa.table(
                {
                    "y": pa.array(np.arange(lo, lo + per) % 2, pa.int8()),
                    "rid": pa.array(np.arange(lo, lo + per)),
                }
            ),
            d / f"part-{i:05d}.parquet",
        )
    base = _open_fds()
    seen: list[int] = []
    peak = 0
    for r in range(2):
        rd = ParquetReader(str(d), RID_SPEC, 64, rank=r, world_size=2, seed=5, shuffle_buffer=500)
        assert _open_fds() <= base + 2  # footers read, files closed again
        for b in rd:
            peak = max(peak, _open_fds() - base)
            seen += _ids([b])
        assert rd.max_files_open_seen <= rd.max_open_files
        assert rd.open_files() == 0
    assert peak <= 8, peak  # a handful, never thousands
    assert sorted(seen) == list(range(n_files * per))


def test_several_paths_and_hive_partitions(tmp_path):
    from rocketrec.cli import main

    for day, (lo, hi) in (("2026-11-25", (0, 300)), ("2026-11-26", (300, 700))):
        part = tmp_path / "logs" / f"date={day}"
        part.mkdir(parents=True)
        t = pa.table(
            {"y": pa.array(np.arange(lo, hi) % 2, pa.int8()), "rid": pa.array(np.arange(lo, hi))}
        )
        pq.write_table(t, part / "part-0.parquet", row_group_size=64)
    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"y": pa.array([0, 1], pa.int8()), "rid": pa.array([700, 701])}), extra)
    paths = [str(tmp_path / "logs" / "date=2026-11-2*"), str(extra)]
    rd = ParquetReader(paths, RID_SPEC, 50, shuffle=False)
    assert sorted(_ids(rd)) == list(range(702))
    # one partition folder only
    rd = ParquetReader([str(tmp_path / "logs" / "date=2026-11-26")], RID_SPEC, 50, shuffle=False)
    assert sorted(_ids(rd)) == list(range(300, 700))
    spec = tmp_path / "rid.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(RID_SPEC.to_dict()))
    assert main(["validate", str(spec), "--data", *paths]) == 0
    assert main(["validate", str(spec), "--data", str(tmp_path / "nope"), str(extra)]) == 2


def test_negative_downsampling_deterministic_across_world_sizes(tmp_path):
    n = _write_rid_files(tmp_path)  # label = rid % 2: 450 positives
    kept = {}
    for world in (1, 2, 3):
        seen = []
        for r in range(world):
            rd = ParquetReader(
                str(tmp_path),
                RID_SPEC,
                16,
                rank=r,
                world_size=world,
                seed=4,
                negative_sample_rate=0.25,
            )
            seen += _ids(rd)
        assert len(seen) == len(set(seen))  # every kept row once
        kept[world] = sorted(seen)
    assert kept[1] == kept[2] == kept[3]
    pos = [i for i in kept[1] if i % 2 == 1]
    neg = [i for i in kept[1] if i % 2 == 0]
    assert len(pos) == n // 2  # every click kept
    assert 0.15 < len(neg) / (n // 2) < 0.35  # about a quarter of the non-clicks
    # another seed keeps other negatives; rate 1 keeps everything
    other = ParquetReader(str(tmp_path), RID_SPEC, 16, seed=5, negative_sample_rate=0.25)
    assert sorted(_ids(other)) != kept[1]
    assert sorted(_ids(ParquetReader(str(tmp_path), RID_SPEC, 16, seed=4))) == list(range(n))
    # exact resume with sampling on
    kw = dict(rank=0, world_size=2, seed=4, negative_sample_rate=0.25, shuffle_buffer=64)
    full = _ids(ParquetReader(str(tmp_path), RID_SPEC, 16, **kw))
    rd = ParquetReader(str(tmp_path), RID_SPEC, 16, **kw)
    it = iter(rd)
    head = [next(it) for _ in range(5)]
    state = rd.state_dict()
    it.close()
    again = ParquetReader(str(tmp_path), RID_SPEC, 16, **kw)
    again.load_state_dict(state)
    assert _ids(head) + _ids(again) == full
    with pytest.raises(ValueError, match="negative_sample_rate"):
        ParquetReader(str(tmp_path), RID_SPEC, 16, negative_sample_rate=0.0)


@pytest.mark.parametrize("buffer", [0, 128])
@pytest.mark.parametrize("worlds", [(2, 1), (1, 3), (3, 2), (2, 1, 3, 2)])
def test_resume_at_other_worker_counts_trains_each_row_once(tmp_path, worlds, buffer):
    """Each world trains a few batches per rank (the loop's common step count), then the
    next world continues from every rank's trained state: over the whole epoch no row
    is trained twice and none is skipped but each last world's short last batches."""
    n = _write_rid_files(tmp_path)
    kw = dict(seed=5, shuffle_buffer=buffer, drop_last=True)
    trained: list[int] = []
    states = None
    for k, world in enumerate(worlds):
        readers = [
            ParquetReader(str(tmp_path), RID_SPEC, 16, rank=r, world_size=world, **kw)
            for r in range(world)
        ]
        for rd in readers:
            rd.trace = lambda b: trained.extend(_ids([b]))
            if states is not None:
                left = rd.load_states(states)
                assert left == n - len(trained)
        last = k == len(worlds) - 1
        steps = readers[0].min_batches_all_ranks(readers[0].epoch) if last else 3 + k
        for rd in readers:
            for _ in rd.take(steps):
                rd.mark_trained()  # the loop marks every batch it trained
        states = [rd.trained_state() for rd in readers]
    assert len(trained) == len(set(trained)), "a row was trained twice"
    e = readers[0].epoch
    unused = readers[0].rows_unused(e, readers[0].min_batches_all_ranks(e))
    assert len(trained) == n - unused and unused < 16 * worlds[-1]
    assert set(trained) <= set(range(n))


def test_states_of_an_older_stream_are_refused(tmp_path):
    _write_rid_files(tmp_path)
    rd = ParquetReader(str(tmp_path), RID_SPEC, 16, seed=5)
    old = {k: v for k, v in rd.state_dict().items() if k not in ("stream", "plan")}
    assert not ParquetReader.continuable(old)
    with pytest.raises(CheckpointError, match="older rocketrec"):
        rd.load_state_dict(old)
