from __future__ import annotations

import json

import pytest

from headpag import HeadSet


def test_parse_forms():
    assert HeadSet.parse("11.15") == HeadSet([(11, 15)])
    assert HeadSet.parse("7") == HeadSet.parse("7.*") == HeadSet([7])
    assert HeadSet.parse("7-9") == HeadSet([7, 8, 9])
    assert HeadSet.parse("3.0-5") == HeadSet([(3, h) for h in range(6)])
    assert HeadSet.parse(" 11 . 15 ,  7 ") == HeadSet([(11, 15), 7])
    assert HeadSet.parse("7-8.2") == HeadSet([(7, 2), (8, 2)])
    assert HeadSet.parse("") == HeadSet()


@pytest.mark.parametrize("spec", ["11.15, 7, 3.0-5", "0.23, 0.1, 0.2, 1, 2, 3, 10.4", "7-9, 12.0-2, 12.5", "5.*"])
def test_canonical_round_trip(spec):
    hs = HeadSet.parse(spec)
    assert HeadSet.parse(str(hs)) == hs
    assert str(HeadSet.parse(str(hs))) == str(hs)


def test_canonical_form():
    assert str(HeadSet.parse("11.15, 7, 3.0-5, 8, 3.7")) == "3.0-5, 3.7, 7-8, 11.15"
    assert repr(HeadSet([1])) == "HeadSet('1')"


def test_whole_layer_absorbs_heads_and_set_ops():
    a = HeadSet.parse("7.3, 7")
    assert a == HeadSet([7]) and len(a) == 1
    b = HeadSet([(1, 10)]) | "11.15"
    assert b == HeadSet([(1, 10), (11, 15)])
    assert (11, 15) in b and (7, 0) in a and 7 in a and (2, 0) not in b
    assert hash(HeadSet.parse("1.2, 3.4")) == hash(HeadSet([(3, 4), (1, 2)]))
    assert list(b) == [(1, 10), (11, 15)]
    assert b.layers() == [1, 11]
    assert {HeadSet([1]), HeadSet.parse("1.*")} == {HeadSet([1])}


def test_resolve_expands_and_validates():
    hs = HeadSet.parse("2, 0.1").resolve(num_layers=3, num_heads=4)
    assert hs.pairs() == [(0, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert hs.heads_by_layer() == {0: [1], 2: [0, 1, 2, 3]}
    with pytest.raises(ValueError, match=r"'5\.1'.*valid layers are 0-3"):
        HeadSet.parse("5.1").resolve(4, 4)
    with pytest.raises(ValueError, match=r"'1\.9'.*valid heads are 0-3"):
        HeadSet.parse("1.9").resolve(4, 4)
    with pytest.raises(ValueError, match=r"'7'.*valid layers are 0-3"):
        HeadSet.parse("7").resolve(4, 4)
    with pytest.raises(ValueError, match="resolve"):
        HeadSet([1]).pairs()


@pytest.mark.parametrize("bad", ["a", "1.2.3", "1,,2", "3-1", "1.5-2", "-1", "1.x", "1..2"])
def test_parse_errors_name_the_entry(bad):
    with pytest.raises(ValueError, match="head spec"):
        HeadSet.parse(bad)


@pytest.mark.parametrize("bad", [[(1, -1)], [(-1, 0)], [1.5], [(1, 2, 3)], [True], ["x"]])
def test_construction_errors(bad):
    with pytest.raises(ValueError):
        HeadSet(bad)


def test_json_round_trip(tmp_path):
    hs = HeadSet.parse("11.15, 7, 0.23")
    path = hs.save(
        tmp_path / "heads.json",
        model_family="sd3",
        model_name="stabilityai/stable-diffusion-3-medium-diffusers",
        num_layers=24,
        num_heads=24,
        recommended_scale=3.0,
        identity_weight=0.5,
        provenance={"search": "runs/x", "round": 1},
    )
    doc = json.loads(path.read_text())
    assert doc["format"] == "headpag.headset" and doc["spec"] == "0.23, 7, 11.15"
    loaded = HeadSet.load(path)
    assert loaded == hs
    assert loaded.metadata["identity_weight"] == 0.5 and loaded.metadata["provenance"]["round"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["heads.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"spec": "1"}', "missing the 'heads'"),
        ('{"heads": "1.2"}', "must be a list"),
        ('{"heads": [[1]]}', r"heads\[0\]"),
        ('{"heads": [[1, -2]]}', r"heads\[0\]"),
        ('{"heads": [[1, 2]], "identity_weight": 2}', "identity_weight"),
        ('{"heads": [[30, 2]], "num_layers": 24, "num_heads": 24}', "valid layers are 0-23"),
        ('{"format": "other", "heads": []}', "'format'"),
    ],
)
def test_malformed_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        HeadSet.load(path)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        HeadSet.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="Unknown head-set metadata"):
        HeadSet([1]).save(tmp_path / "x.json", colour="red")
    assert not (tmp_path / "x.json").exists()
