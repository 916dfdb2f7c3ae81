"""Shared fixtures: tiny specs and synthetic data made by the tests themselves."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "feature_specs"
CRITEO = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.parquet"

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

# A small spec that covers every kind of feature: int64 and string ids, scalar
# and list, a table shared by two features, mean pooling, two embedding dims,
# every dense transform, a weight column and a light subset.
TINY_SPEC = """
version: 1
name: tiny
label: {column: y}
weight: {column: w}
tables:
  - {name: t_user, rows: 500, dim: 8}
  - {name: t_ad, rows: 300, dim: 8, pooling: mean}
  - {name: t_tag, rows: 100, dim: 4, pooling: mean}
  - {name: t_ctx, rows: 50, dim: 4}
sparse:
  - {name: user, column: user, dtype: int64, table: t_user}
  - {name: ad, column: ad, dtype: string, table: t_ad}
  - {name: tags, column: tags, dtype: int64, kind: list, table: t_tag, max_ids: 3}
  - {name: queries, column: queries, dtype: string, kind: list, table: t_tag}
  - {name: ctx, column: ctx, dtype: int64, table: t_ctx}
dense:
  - {name: price, column: price, fill: 1.0, transform: log1p}
  - {name: score, column: score, fill: 0.0, transform: clip, min: 0.0, max: 5.0}
  - {name: pos, column: pos, fill: 2.0, transform: standardize, mean: 2.0, std: 1.5}
  - {name: raw, column: raw, fill: 0.0}
light:
  features: [user, ad, tags, price, pos]
"""


# Crosses and bucketized numbers: a cross of a string and a list feature whose inputs
# the light tower does not read itself, a three-way cross with a bucketized input, a
# bucketized column shared with a dense feature, mixed user/ad/context inputs.
CROSS_SPEC = """
version: 1
name: crossy
label: {column: y}
tables:
  - {name: t_user, rows: 400, dim: 8}
  - {name: t_city, rows: 60, dim: 8}
  - {name: t_ad, rows: 300, dim: 8}
  - {name: t_tag, rows: 100, dim: 4, pooling: mean}
  - {name: t_cross, rows: 997, dim: 4}
  - {name: t_band, rows: 8, dim: 4}
sparse:
  - {name: user_id, column: user_id, dtype: int64, table: t_user}
  - {name: user_city, column: user_city, dtype: string, table: t_city}
  - {name: user_tags, column: user_tags, dtype: int64, kind: list, table: t_tag, max_ids: 4}
  - {name: ad_id, column: ad_id, dtype: string, table: t_ad}
  - {name: ad_cat, column: ad_cat, dtype: int64, table: t_tag}
  - {name: city_x_cat, kind: cross, inputs: [user_city, ad_cat], table: t_cross}
  - {name: tags_x_ad, kind: cross, inputs: [user_tags, ad_id], table: t_cross, max_ids: 3}
  - {name: price_band, column: ad_price, kind: bucketize, boundaries: [0.5, 1, 5, 20, 100], table: t_band}
  - {name: band_x_cat_x_city, kind: cross, inputs: [price_band, ad_cat, user_city], table: t_cross}
dense:
  - {name: ad_price, column: ad_price, fill: 1.0, transform: log1p}
  - {name: user_age, column: user_age, fill: 0.0, transform: standardize, mean: 3.0, std: 2.0}
light:
  features: [user_id, user_tags, ad_id, city_x_cat, tags_x_ad, price_band, band_x_cat_x_city, ad_price, user_age]
"""


@pytest.fixture(scope="session")
def cross_spec(tmp_path_factory):
    from rocketrec.spec import load_spec

    p = tmp_path_factory.mktemp("spec") / "crossy.yaml"
    p.write_text(CROSS_SPEC)
    return load_spec(p)


@pytest.fixture(scope="session")
def cross_data(tmp_path_factory, cross_spec) -> dict[str, str]:
    from rocketrec.data.synth import SynthConfig, synth

    root = tmp_path_factory.mktemp("crossdata")
    synth(cross_spec, str(root / "train"), SynthConfig(rows=6000, seed=1, row_group_size=1000))
    synth(cross_spec, str(root / "val"), SynthConfig(rows=2000, seed=2, row_group_size=1000))
    return {"train": str(root / "train"), "val": str(root / "val")}


@pytest.fixture(scope="session")
def tiny_spec_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    p.write_text(TINY_SPEC)
    return p


@pytest.fixture(scope="session")
def tiny_spec(tiny_spec_path):
    from rocketrec.spec import load_spec

    return load_spec(tiny_spec_path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_spec) -> dict[str, str]:
    """Train (8k rows, 4 files of 1k-row groups) and validation (4k rows) for tiny.yaml."""
    from rocketrec.data.synth import SynthConfig, synth

    root = tmp_path_factory.mktemp("tinydata")
    synth(
        tiny_spec,
        str(root / "train"),
        SynthConfig(rows=8000, seed=1, files=4, row_group_size=1000, ctr=0.2),
    )
    synth(
        tiny_spec,
        str(root / "val"),
        SynthConfig(rows=4000, seed=2, files=1, row_group_size=1000, ctr=0.2),
    )
    return {"train": str(root / "train"), "val": str(root / "val")}


# A sequence on a table it shares with its query (t_ad), one on a table of its own with a
# query of the same dim; the light tower reads the second as a mean-pooled bag.
SEQ_SPEC = """
version: 1
name: seqy
label: {column: y}
teacher: {column: pctr, kind: probability}
tables:
  - {name: t_user, rows: 500, dim: 8}
  - {name: t_ad, rows: 300, dim: 8, pooling: mean}
  - {name: t_hist, rows: 100, dim: 8}
  - {name: t_ctx, rows: 50, dim: 4}
sparse:
  - {name: user, column: user, dtype: int64, table: t_user}
  - {name: ad, column: ad, dtype: string, table: t_ad}
  - {name: ad_cat, column: ad_cat, dtype: int64, table: t_hist}
  - {name: hist_ads, column: hist_ads, dtype: string, kind: sequence, table: t_ad, max_len: 6, query: ad}
  - {name: hist_cats, column: hist_cats, dtype: int64, kind: sequence, table: t_hist, max_len: 4, query: ad_cat}
  - {name: ctx, column: ctx, dtype: int64, table: t_ctx}
dense:
  - {name: price, column: price, fill: 1.0, transform: log1p}
light:
  features: [user, ad, hist_cats, ctx, price]
"""


@pytest.fixture(scope="session")
def seq_spec_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "seqy.yaml"
    p.write_text(SEQ_SPEC)
    return p


@pytest.fixture(scope="session")
def seq_spec(seq_spec_path):
    from rocketrec.spec import load_spec

    return load_spec(seq_spec_path)


@pytest.fixture(scope="session")
def seq_data(tmp_path_factory, seq_spec) -> dict[str, str]:
    """Train (6k rows, 3 files) and validation (2k rows) for the sequence spec."""
    from rocketrec.data.synth import SynthConfig, synth

    root = tmp_path_factory.mktemp("seqdata")
    synth(
        seq_spec,
        str(root / "train"),
        SynthConfig(rows=6000, seed=1, files=3, row_group_size=1000, ctr=0.2),
    )  # noqa: E501
    synth(seq_spec, str(root / "val"), SynthConfig(rows=2000, seed=2, row_group_size=1000, ctr=0.2))  # noqa: E501
    return {"train": str(root / "train"), "val": str(root / "val")}


SMALL_MODEL = dict(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,))


def small_model(**over):  # type: ignore[no-untyped-def]
    """The small ModelConfig tests train (fast on 2 cores); `over` changes fields."""
    from rocketrec.model.towers import ModelConfig

    return ModelConfig(**{**SMALL_MODEL, **over})  # type: ignore[arg-type]


def train_small(spec, data: dict[str, str], out, steps: int, val: bool = True, **model) -> None:
    """A few steps of a small rocket model (fixtures that need a checkpoint to export)."""
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    train(
        spec,
        data["train"],
        data["val"] if val else None,
        str(out),
        small_model(**model),
        None,
        TrainConfig(batch_size=512, max_steps=steps, log_every=0),
    )


def python_exe() -> str:
    return sys.executable


def venv_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def bump_manifest_format(
    src: Path, dst: Path, fmt: str | None, op_version: int | None = None
) -> Path:
    """A copy of exported model `src` whose manifest says format `fmt` (None: as it was)
    and, if given, op library version `op_version`."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/extra/manifest.json"):
                man = json.loads(data)
                if fmt is not None:
                    man["format"] = fmt
                if op_version is not None:
                    man["op_library"]["version"] = op_version
                data = json.dumps(man).encode()
            zout.writestr(info, data)
    return dst


# -- running in two processes (pytest-xdist, `make test`: -n 2) ------------------------
# Tests that start a Ray cluster run one after another in one process (clusters on fixed
# loopback ports, and `ray stop` in one test must not meet another's cluster), and they
# are collected first so that long chain starts at once; a file whose fixtures are
# module-scoped (a C++ build, a trained run) stays in one process so they are built once.
# Every other test goes wherever a process is free. (xdist's own `--dist loadgroup` does
# not group under pytest 9: it renames `item._nodeid`, which pytest 9 no longer reads.)
RAY_FILES = {"test_ray.py", "test_follow.py"}
MODULE_FIXTURE_FILES = {
    "test_cpp.py",
    "test_checkpoint_verify.py",
    "test_evaluate.py",
    "test_export.py",
    "test_scale.py",
    "test_serving.py",
    "test_synth_sequences.py",
}


def _scope(nodeid: str) -> str:
    """The unit one process runs: the Ray tests, a module-fixture file, or one test."""
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1]
    if name in RAY_FILES:
        return "ray"
    return path if name in MODULE_FIXTURE_FILES else nodeid


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    items.sort(key=lambda it: _scope(it.nodeid) != "ray")  # stable: the Ray chain first


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):  # type: ignore[no-untyped-def]
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return Scheduling(config, log)
