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


# ---------------------------------------------------------------------- bounded specs
@pytest.mark.parametrize(
    "spec, match",
    [
        ("0-99999999", r"'0-99999999'.*layers 24-99999999 do not exist; valid layers are 0-23"),
        ("5.0-99999999", r"'5\.0-99999999'.*heads 24-99999999 do not exist; valid heads are 0-23"),
        ("0-99999999.0-99999999", r"layers 24-99999999 do not exist; valid layers are 0-23"),
        ("3-30.1", r"'3-30\.1'.*layers 24-30 do not exist"),
        ("1.2, 2.24", r"'2\.24'.*head 24 does not exist; valid heads are 0-23"),
    ],
)
def test_huge_ranges_are_checked_before_expansion(spec, match):
    import time
    import tracemalloc

    tracemalloc.start()
    try:
        start = time.perf_counter()
        hs = HeadSet.parse(spec)
        for check in (hs.check, hs.resolve):
            with pytest.raises(ValueError, match=match):
                check(24, 24)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1_000_000  # the old parser built a 100M-entry list here
    assert len(hs._rows) <= 2  # ranges stay symbolic


def test_huge_ranges_stay_symbolic():
    hs = HeadSet.parse("0-99999999")
    assert len(hs._rows) == 1 and len(hs) == 100_000_000
    assert str(hs) == "0-99999999" and 99_999_999 in hs and (5, 3) in hs
    assert hs | "3.1" == hs and HeadSet.parse("0-99999999.0-99999999") != hs
    with pytest.raises(ValueError, match="resolve"):
        hs.layers()
    with pytest.raises(ValueError, match="resolve"):
        HeadSet.parse("0.0-99999999").pairs()
    assert HeadSet.parse("0-3, 2.1, 1-23").check(24, 24) == HeadSet(range(24))


def test_spec_limits():
    from headpag.guidance.head_rows import MAX_SPEC_CHARS, MAX_SPEC_ENTRIES

    with pytest.raises(ValueError, match=f"at most {MAX_SPEC_CHARS} are allowed"):
        HeadSet.parse("1" + " " * MAX_SPEC_CHARS)
    with pytest.raises(ValueError, match=f"at most {MAX_SPEC_ENTRIES} are allowed"):
        HeadSet.parse(",".join(["1"] * (MAX_SPEC_ENTRIES + 1)))
    assert HeadSet.parse(",".join(["1"] * MAX_SPEC_ENTRIES)) == HeadSet([1])
    with pytest.raises(ValueError, match="more than 9 digits"):
        HeadSet.parse("1234567890")
    with pytest.raises(ValueError, match="Head spec must be a string"):
        HeadSet.parse(1)  # type: ignore[arg-type]


def test_pathological_specs_are_fast():
    import time

    nested_distinct = ",".join(f"{i}-{3000 - i}.{i}" for i in range(1000))  # quadratic canonical form
    nested_same = ",".join(f"{i}-{3000 - i}.0" for i in range(1400))
    blank_bomb = "1" + " " * 19_000 + "x"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="overlapping"):
        HeadSet.parse(nested_distinct)
    assert HeadSet.parse(nested_same) == HeadSet.parse("0-3000.0")
    with pytest.raises(ValueError, match="head spec entry"):
        HeadSet.parse(blank_bomb)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ([float("nan")], "float nan"),
        ([float("inf")], "float inf"),
        ([(1, float("nan"))], "head must be an int >= 0"),
        ([(float("inf"), 1)], "layer must be an int >= 0"),
        ([(1, 2.0)], "float 2.0"),
        ([-1], "got -1"),
        ([(1, -2)], "got -2"),
        ([(True, 1)], "bool True"),
        ([(1, False)], "bool False"),
        ([[1, 2, 3]], "expected a layer int"),
        ([None], "layer must be an int"),
        (1.5, "Cannot build a head set"),
        (True, "Cannot build a head set"),
        (b"11", "Cannot build a head set"),
    ],
)
def test_bad_numbers_are_refused_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        HeadSet(bad)
    if not isinstance(bad, (float, bool, bytes)):
        with pytest.raises(ValueError, match=match):
            HeadSet.coerce(bad)


def test_integer_like_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    assert HeadSet([(np.int64(1), np.int32(2)), np.int64(3)]) == HeadSet.parse("1.2, 3")
    assert HeadSet(np.int64(4)) == HeadSet([4])


def test_check_validates_the_model_shape():
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="num_layers must be a positive int"):
            HeadSet([1]).check(bad, 4)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            HeadSet([1]).resolve(4, bad)  # type: ignore[arg-type]
    hs = HeadSet.parse("1")
    assert hs.check(4, 4) is hs


# ---------------------------------------------------------------------- one meaning for a string
def test_constructor_string_is_a_spec():
    assert HeadSet("11") == HeadSet.coerce("11") == HeadSet.parse("11") == HeadSet([11])
    assert HeadSet("11").layers() == [11]
    assert HeadSet("11.15, 7") == HeadSet([(11, 15), 7])
    assert HeadSet(11) == HeadSet.coerce(11) == HeadSet([11])
    assert HeadSet(None) == HeadSet.coerce(None) == HeadSet()
    assert HeadSet(["11", (1, 2)]) == HeadSet.parse("1.2, 11")
    with pytest.raises(ValueError, match="head spec"):
        HeadSet("1.x")


# ---------------------------------------------------------------------- symbolic rows behave like the old sets
def _brute(entries: list[tuple[int, int, tuple[int, int] | None]]) -> set:
    heads = set()
    for lo, hi, h in entries:
        for layer in range(lo, hi + 1):
            heads |= {(layer, None)} if h is None else {(layer, x) for x in range(h[0], h[1] + 1)}
    whole = {layer for layer, h in heads if h is None}
    return {e for e in heads if e[1] is None or e[0] not in whole}


def test_symbolic_sets_match_expanded_sets():
    import random

    rng = random.Random(0)
    for _ in range(300):
        entries = []
        for _ in range(rng.randint(0, 5)):
            lo = rng.randint(0, 8)
            a = rng.randint(0, 5)
            entries.append((lo, rng.randint(lo, 9), None if rng.random() < 0.25 else (a, rng.randint(a, 6))))
        spec = ", ".join(f"{lo}-{hi}" + ("" if h is None else f".{h[0]}-{h[1]}") for lo, hi, h in entries)
        hs, expected = HeadSet.parse(spec), _brute(entries)
        assert set(hs) == expected and len(hs) == len(expected)
        assert list(hs) == sorted(expected, key=lambda e: (e[0], -1 if e[1] is None else e[1]))
        assert HeadSet(sorted(expected, key=str)) == hs and HeadSet.parse(str(hs)) == hs
        assert all(
            ((l, h) in hs) == ((l, h) in expected or (l, None) in expected) for l in range(11) for h in range(8)
        )
        full = {(l, h) for l, h in expected if h is not None} | {
            (l, x) for l, h in expected if h is None for x in range(7)
        }
        resolved = hs.resolve(10, 7)
        assert set(resolved.pairs()) == full
        other = HeadSet.parse(", ".join(f"{lo}-{hi}.{h[0]}-{h[1]}" for lo, hi, h in entries[:2] if h is not None))
        assert set((resolved - other).pairs()) == full - set(other)
        assert set(resolved | other) == full | set(other)


def test_multi_layer_rows_are_canonical():
    assert str(HeadSet([(7, 2), (8, 2), (9, 2)])) == "7-9.2"
    assert str(HeadSet.parse("0-9.2") | "5.3") == "0-4.2, 5.2-3, 6-9.2"
    assert str(HeadSet.parse("0-9.2, 3")) == "0-2.2, 3, 4-9.2"
    assert str(HeadSet.parse("0-3.0-3") - "1-2.1") == "0.0-3, 1-2.0, 1-2.2-3, 3.0-3"
