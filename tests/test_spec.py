"""Feature spec parsing: good specs load; every ad-engineer mistake is one clear line."""

from __future__ import annotations

import subprocess

import pytest

from conftest import CRITEO, SPECS, TINY_SPEC, venv_bin
from rocketrec.spec import SpecError, load_spec, spec_from_dict


def test_shipped_specs_load():
    ads = load_spec(SPECS / "ads_ctr.yaml")
    assert len(ads.light_features) < len(ads.sparse) + len(ads.dense)
    shared = {}
    for f in ads.sparse:
        shared.setdefault(f.table, []).append(f.name)
    assert any(len(v) > 1 for v in shared.values()), "a table shared by two features"
    assert {f.kind for f in ads.sparse} == {"scalar", "list", "cross", "bucketize", "sequence"}
    assert ads.sequence_tables == ["ads", "categories"]
    assert not any(f.kind == "sequence" for f in ads.light_sparse)  # booster only
    assert {f.dtype for f in ads.id_features} == {"int64", "string"}
    light = set(ads.light_features)
    assert any(f.kind == "cross" and f.name in light for f in ads.sparse)
    assert any(f.kind == "bucketize" and f.name in light for f in ads.sparse)
    criteo = load_spec(SPECS / "criteo.yaml")
    assert [f.column for f in criteo.dense] == [f"I{i}" for i in range(1, 14)]
    assert [f.column for f in criteo.sparse] == [f"C{i}" for i in range(1, 27)]


def test_round_trip(tiny_spec, cross_spec):
    again = spec_from_dict(tiny_spec.to_dict(), source="x")
    assert again == tiny_spec
    assert spec_from_dict(cross_spec.to_dict(), source="y") == cross_spec


def _cross_mutate(old: str, new: str) -> str:
    from conftest import CROSS_SPEC

    assert old in CROSS_SPEC, old
    return CROSS_SPEC.replace(old, new, 1)


CROSS = "{name: city_x_cat, kind: cross, inputs: [user_city, ad_cat], table: t_cross}"
BAND = (
    "{name: price_band, column: ad_price, kind: bucketize, boundaries: [0.5, 1, 5, 20, 100], "
    "table: t_band}"
)
BROKEN_NEW_KINDS = {
    "cross without inputs": (
        CROSS.replace("inputs: [user_city, ad_cat], ", ""),
        ["'inputs'", "required"],
    ),
    "cross of one input": (
        CROSS.replace("[user_city, ad_cat]", "[user_city]"),
        ["'inputs'", "at least two"],
    ),
    "cross input unknown": (
        CROSS.replace("[user_city, ad_cat]", "[user_cty, ad_cat]"),
        ["feature 'city_x_cat'", "'inputs'", "user_cty", "did you mean 'user_city'"],
    ),
    "cross input twice": (CROSS.replace("[user_city, ad_cat]", "[ad_cat, ad_cat]"), ["twice"]),
    "cross of a cross": (
        CROSS.replace("[user_city, ad_cat]", "[tags_x_ad, ad_cat]"),
        ["'tags_x_ad' is itself a cross"],
    ),
    "cross with a column": (
        CROSS.replace("kind: cross,", "kind: cross, column: x,"),
        ["'column' does not apply to kind 'cross'"],
    ),
    "cross with a dtype": (
        CROSS.replace("kind: cross,", "kind: cross, dtype: string,"),
        ["'dtype' does not apply"],
    ),
    "cross inputs not a list": (
        CROSS.replace("[user_city, ad_cat]", "user_city"),
        ["'inputs'", "list"],
    ),
    "bucketize without boundaries": (
        BAND.replace("boundaries: [0.5, 1, 5, 20, 100], ", ""),
        ["feature 'price_band'", "'boundaries'", "required"],
    ),
    "bucketize not increasing": (
        BAND.replace("[0.5, 1, 5, 20, 100]", "[0.5, 5, 1]"),
        ["strictly increasing"],
    ),
    "bucketize equal boundaries": (
        BAND.replace("[0.5, 1, 5, 20, 100]", "[1, 1.0]"),
        ["strictly increasing"],
    ),
    "bucketize empty": (BAND.replace("[0.5, 1, 5, 20, 100]", "[]"), ["at least one"]),
    "bucketize not a number": (
        BAND.replace("[0.5, 1, 5, 20, 100]", "[0.5, high]"),
        ["'high' is not a finite number"],
    ),
    "bucketize nan": (BAND.replace("[0.5, 1, 5, 20, 100]", "[0.5, .nan]"), ["not a finite number"]),
    "bucketize too few rows": (
        BAND.replace("[0.5, 1, 5, 20, 100]", "[1, 2, 3, 4, 5, 6, 7]"),
        ["table 't_band' has 8 rows", "at least 9"],
    ),
    "bucketize without column": (BAND.replace("column: ad_price, ", ""), ["'column'", "required"]),
    "bucketize with max_ids": (
        BAND.replace("kind: bucketize,", "kind: bucketize, max_ids: 2,"),
        ["'max_ids' does not apply to kind 'bucketize'"],
    ),
    "bucketize with a dtype": (
        BAND.replace("kind: bucketize,", "kind: bucketize, dtype: int64,"),
        ["'dtype' does not apply"],
    ),
    "boundaries on a list": (
        None,
        ["'boundaries' does not apply to kind 'list'"],
    ),
    "inputs on a scalar": (None, ["'inputs' does not apply to kind 'scalar'"]),
    "unknown kind": (BAND.replace("kind: bucketize", "kind: bucket"), ["'kind'", "bucketize"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_NEW_KINDS))
def test_broken_cross_and_bucketize_keys(tmp_path, case):
    line, needles = BROKEN_NEW_KINDS[case]
    if case == "boundaries on a list":
        text = _cross_mutate(
            "kind: list, table: t_tag", "kind: list, boundaries: [1], table: t_tag"
        )
    elif case == "inputs on a scalar":
        text = _cross_mutate(
            "{name: user_id, column: user_id,", "{name: user_id, inputs: [a, b], column: user_id,"
        )
    else:
        text = _cross_mutate(CROSS if "cross" in case else BAND, line)
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def _mutate(old: str, new: str) -> str:
    assert old in TINY_SPEC, old
    return TINY_SPEC.replace(old, new, 1)


BROKEN = {
    "group typo": (
        _mutate("weight: {column: w}", "weight: {column: w}\ngroup: {colum: user}"),
        ["group", "colum", "did you mean 'column'"],
    ),
    "group is the label": (
        _mutate("weight: {column: w}", "weight: {column: w}\ngroup: {column: y}"),
        ["group", "label or weight"],
    ),
    "group not a string": (
        _mutate("weight: {column: w}", "weight: {column: w}\ngroup: {column: [a, b]}"),
        ["group", "column"],
    ),
    "unknown top key": (_mutate("name: tiny", "name: tiny\ncolour: red"), ["unknown key 'colour'"]),
    "typo in key": (
        _mutate("{name: user, column: user,", "{name: user, colum: user,"),
        ["colum", "did you mean 'column'"],
    ),
    "missing table": (
        _mutate("table: t_user}", "table: t_users}"),
        ["feature 'user'", "'table'", "t_users"],
    ),
    "duplicate feature": (
        _mutate("{name: ctx, column: ctx", "{name: user, column: ctx"),
        ["feature 'user'", "duplicate"],
    ),
    "duplicate table": (
        _mutate("{name: t_ctx, rows: 50", "{name: t_tag, rows: 50"),
        ["table 't_tag'", "duplicate"],
    ),
    "zero rows": (_mutate("rows: 500", "rows: 0"), ["table 't_user'", "'rows'", ">= 1"]),
    "negative dim": (
        _mutate("rows: 500, dim: 8", "rows: 500, dim: -8"),
        ["table 't_user'", "'dim'"],
    ),
    "bad pooling": (
        _mutate("pooling: mean}\n  - {name: t_tag", "pooling: max}\n  - {name: t_tag"),
        ["table 't_ad'", "'pooling'", "max"],
    ),
    "light unknown": (
        _mutate("features: [user,", "features: [usr,"),
        ["light", "usr", "did you mean 'user'"],
    ),
    "wrong yaml type": (
        _mutate("rows: 500", "rows: lots"),
        ["table 't_user'", "'rows'", "integer"],
    ),
    "bad dtype": (
        _mutate("dtype: int64, table: t_user", "dtype: float, table: t_user"),
        ["feature 'user'", "'dtype'"],
    ),
    "bad kind": (
        _mutate("kind: list, table: t_tag, max", "kind: bag, table: t_tag, max"),
        ["feature 'tags'", "'kind'"],
    ),
    "std zero": (_mutate("std: 1.5", "std: 0"), ["feature 'pos'", "'std'"]),
    "clip no bounds": (
        _mutate("transform: clip, min: 0.0, max: 5.0", "transform: clip"),
        ["feature 'score'", "clip"],
    ),
    "mean on log1p": (
        _mutate("transform: log1p}", "transform: log1p, mean: 3}"),
        ["feature 'price'", "'mean'"],
    ),
    "missing label": (_mutate("label: {column: y}\n", ""), ["'label'", "required"]),
    "duplicate yaml key": (
        _mutate("rows: 500, dim: 8", "rows: 500, rows: 600, dim: 8"),
        ["duplicate key 'rows'"],
    ),
    "dim not multiple of 4": (
        _mutate("rows: 500, dim: 8", "rows: 500, dim: 6"),
        ["table 't_user'", "'dim'", "multiple of 4"],
    ),
    "bad version": (_mutate("version: 1", "version: 7"), ["'version'"]),
    "features not list": (
        _mutate("features: [user, ad, tags, price, pos]", "features: user"),
        ["light", "'features'", "list"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_spec_names_the_problem(tmp_path, case):
    text, needles = BROKEN[case]
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert msg.startswith(str(p)), msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("key: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("\x00\x01", "x.yaml"),
    ],
)
def test_not_a_spec(tmp_path, text, needle):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match=needle):
        load_spec(p)


def test_validate_cli_one_line_no_traceback(tmp_path, tiny_spec_path):
    exe = venv_bin("rocketrec")
    ok = subprocess.run([exe, "validate", str(tiny_spec_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok:" in ok.stdout
    p = tmp_path / "bad.yaml"
    p.write_text(_mutate("table: t_user}", "table: nope}"))
    bad = subprocess.run([exe, "validate", str(p)], capture_output=True, text=True)
    assert bad.returncode == 2
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert str(p) in lines[0] and "feature 'user'" in lines[0] and "'table'" in lines[0]
    missing = subprocess.run(
        [exe, "validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_validate_data_missing_column(tmp_path, tiny_spec_path, tiny_data):
    import pyarrow.parquet as pq

    t = pq.read_table(tiny_data["val"]).drop_columns(["price"])
    pq.write_table(t, tmp_path / "d.parquet")
    r = subprocess.run(
        [
            venv_bin("rocketrec"),
            "validate",
            str(tiny_spec_path),
            "--data",
            str(tmp_path / "d.parquet"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "column 'price'" in r.stderr and "d.parquet" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not CRITEO.exists(), reason="shared Criteo sample not present")
def test_criteo_spec_validates_against_sample():
    r = subprocess.run(
        [venv_bin("rocketrec"), "validate", str(SPECS / "criteo.yaml"), "--data", str(CRITEO)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "10,181 rows" in r.stdout


@pytest.mark.parametrize("name", ["items", "keys", "forward", "a.b"])
def test_table_names_torchrec_cannot_hold(tmp_path, name):
    """A table named like a ModuleDict attribute (or with a '.') would crash every worker
    at sharding time: refused in the spec, naming the table and the field."""
    from rocketrec.spec import SpecError, load_spec

    p = tmp_path / "s.yaml"
    p.write_text(
        f"""
version: 1
name: s
label: {{column: y}}
tables: [{{name: "{name}", rows: 10, dim: 4}}]
sparse: [{{name: f, column: f, table: "{name}"}}]
light: {{features: [f]}}
"""
    )
    with pytest.raises(SpecError, match=rf"table '{name}'.*field 'name'"):
        load_spec(p)
