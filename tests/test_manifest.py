"""Manifest validation: whole-manifest errors, per-tile rejects with tile, file and reason, and the
file-level checks of issue 2 (missing file, bad HDU, mismatched grids) as the loader reports them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_release
from pipeline.errors import BadInputError, ManifestError
from pipeline.manifest import MAX_NAME_LENGTH, ManifestWarning, load_manifest
from pipeline.tile import load_tile


@pytest.fixture
def release(tmp_path):
    """A 2-tile release; returns (root, manifest dict, manifest path)."""
    mp, _ = make_release(tmp_path / "rel", n_tiles=2, size=48, n_src=3, seed=130)
    return tmp_path / "rel", yaml.safe_load(mp.read_text()), mp


def write(mp: Path, doc) -> Path:
    mp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return mp


def only_problem(m):
    assert len(m.problems) == 1, m.problems
    return m.problems[0]


def test_good_manifest_loads_with_paths_relative_to_it(release):
    root, doc, mp = release
    m = load_manifest(mp)
    assert m.name == "tiny" and m.bands == ["g", "r"] and [t.id for t in m.tiles] == ["t0000", "t0001"]
    assert not m.problems and len(m.sha256) == 64
    assert m.resolve(m.tiles[0].files["g"].path) == (root / "t0000_g.fits").resolve()


def test_json_manifest(release):
    root, doc, mp = release
    jp = root / "manifest.json"
    jp.write_text(json.dumps(doc))
    assert [t.id for t in load_manifest(jp).tiles] == ["t0000", "t0001"]


@pytest.mark.parametrize("text, reason", [
    ("name: x\ntiles: []\n", r"needs the keys 'bands' and 'tiles'"),
    ("name: x\nbands: []\ntiles: [{id: a}]\n", r"'bands' must be a non-empty list"),
    ("name: x\nbands: [g, '../g']\ntiles: [{id: a}]\n", r"band name '\.\./g' is not allowed"),
    ("name: x\nbands: [g, g]\ntiles: [{id: a}]\n", r"'bands' lists a band twice"),
    ("name: x\nbands: [g]\ntiles: []\n", r"'tiles' must be a non-empty list"),
    ("name: x\nbands: [g]\ntiles: {a: 1}\n", r"'tiles' must be a non-empty list"),
    ("bands: [g\n", r"not valid YAML/JSON"),
    ("- just a list\n", r"needs the keys"),
])
def test_whole_manifest_errors(tmp_path, text, reason):
    mp = write(tmp_path / "manifest.yaml", text)
    with pytest.raises(ManifestError, match=reason) as e:
        load_manifest(mp)
    assert str(mp) in str(e.value)


def test_unreadable_manifest(tmp_path):
    with pytest.raises(ManifestError, match=r"cannot read"):
        load_manifest(tmp_path / "nope.yaml")


def test_unknown_top_level_key_warns(release):
    root, doc, mp = release
    doc["tile"] = []
    with pytest.warns(ManifestWarning, match=r"ignoring unknown top-level key\(s\) \['tile'\]"):
        load_manifest(write(mp, doc))


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "..", ".", "a..b", "/abs", "sp ace", "", "x" * (MAX_NAME_LENGTH + 1)])
def test_unsafe_tile_id_is_rejected_and_keyed_safely(release, bad_id):
    root, doc, mp = release
    doc["tiles"][1]["id"] = bad_id
    m = load_manifest(write(mp, doc))
    assert [t.id for t in m.tiles] == ["t0000"], "the other tile is still processed"
    p = only_problem(m)
    assert p.tile == "manifest-entry-00001" and p.label == bad_id and p.file == str(mp)
    assert p.message().startswith(f"tile {bad_id!r}, file {str(mp)!r}: invalid tile entry 2 of the manifest (id: ")
    assert "tile id" in p.reason


def test_numeric_tile_id_must_be_quoted(release):
    root, doc, mp = release
    doc["tiles"][0]["id"] = 17
    p = only_problem(load_manifest(write(mp, doc)))
    assert p.tile == "17" and "must be a string (quote it in YAML)" in p.reason


@pytest.mark.parametrize("bad_band", ["../r", "r/x", ".."])
def test_unsafe_band_name_in_a_tile(release, bad_band):
    root, doc, mp = release
    doc["tiles"][0]["files"][bad_band] = doc["tiles"][0]["files"].pop("r")
    p = only_problem(load_manifest(write(mp, doc)))
    assert p.tile == "t0000" and p.file == str(mp)
    assert f"band name {bad_band!r} is not allowed" in p.message()


def test_unknown_band_names_tile_file_and_reason(release):
    root, doc, mp = release
    doc["tiles"][1]["files"]["y"] = doc["tiles"][1]["files"].pop("r")
    m = load_manifest(write(mp, doc))
    p = only_problem(m)
    assert [t.id for t in m.tiles] == ["t0000"]
    assert p.message() == (f"tile 't0001', file {str((root / 't0001_r.fits').resolve())!r}: unknown band(s) ['y'] "
                           "(release bands: ['g', 'r']; fix the tile's files or the manifest's 'bands')")


def test_duplicate_tile_id_refuses_every_entry_with_it(release):
    root, doc, mp = release
    doc["tiles"][1]["id"] = "t0000"
    m = load_manifest(write(mp, doc))
    assert m.tiles == []
    p = only_problem(m)
    assert p.tile == "t0000" and p.file == str(mp)
    assert "duplicate tile id: entries [1, 2] of the manifest share it" in p.reason
    assert "t0001_g.fits" in p.reason, "the files of both entries are named"


@pytest.mark.parametrize("change, reason", [
    ({"image": -1}, r"image HDU -1 is not valid"),
    ({"weight": True}, r"weight HDU True is not valid"),
    ({"mask": " "}, r"mask HDU is an empty EXTNAME"),
    ({"wieght": 1}, r"files\.g\.wieght: Extra inputs are not permitted"),
    ({"path": ""}, r"files\.g\.path: String should have at least 1 character"),
    ({"zeropoint": float("nan")}, r"files\.g\.zeropoint: Input should be a finite number"),
])
def test_invalid_band_entry(release, change, reason):
    root, doc, mp = release
    doc["tiles"][0]["files"]["g"].update(change)
    p = only_problem(load_manifest(write(mp, doc)))
    assert p.tile == "t0000" and p.file == str(mp)
    assert "invalid tile entry 1 of the manifest" in p.reason
    import re
    assert re.search(reason, p.reason), p.reason


def test_empty_inner_region_and_missing_files(release):
    root, doc, mp = release
    doc["tiles"][0]["inner"] = {"xmin": 10, "xmax": 10, "ymin": 0, "ymax": 5}
    doc["tiles"][1]["files"] = {}
    m = load_manifest(write(mp, doc))
    reasons = {p.tile: p.reason for p in m.problems}
    assert "inner region is empty" in reasons["t0000"]
    assert "tile lists no band files" in reasons["t0001"]


# ---- the file-level checks of issue 2: they open files, so the loader does them on the worker
def load_first(mp: Path, doc: dict, tile: int = 0):
    m = load_manifest(write(mp, doc))
    return load_tile(m, m.tiles[tile])


def test_missing_file(release):
    root, doc, mp = release
    (root / "t0000_r.fits").unlink()
    with pytest.raises(BadInputError) as e:
        load_first(mp, doc)
    assert (e.value.tile, e.value.file) == ("t0000", str(root.resolve() / "t0000_r.fits"))
    assert str(e.value) == f"tile 't0000', file {e.value.file!r}: band r image file does not exist"


def test_bad_hdu(release):
    root, doc, mp = release
    doc["tiles"][0]["files"]["r"]["mask"] = "DQ"
    with pytest.raises(BadInputError) as e:
        load_first(mp, doc)
    assert e.value.tile == "t0000" and e.value.file.endswith("t0000_r.fits")
    assert e.value.reason == "band r mask HDU 'DQ' not found; the file has 3 HDU(s): 0, 1 (WEIGHT), 2 (MASK)"


def test_mismatched_pixel_grids(release):
    root, doc, mp = release
    doc["tiles"][0]["files"]["r"]["path"] = "../rel2/t0000_r.fits"
    make_release(root.parent / "rel2", n_tiles=1, size=64, n_src=3, seed=131)
    with pytest.raises(BadInputError) as e:
        load_first(mp, doc)
    assert e.value.tile == "t0000" and e.value.file.endswith("rel2/t0000_r.fits")
    assert e.value.reason.startswith("band r pixel grid differs from band g (t0000_g.fits): 64x64 pixels where "
                                     "the tile's grid has 48x48")


def test_provenance_hashes_each_input_file_once_with_its_true_sha256(release, monkeypatch):
    """Image, weight and mask planes usually share one file: its sha256 is computed once, not per plane."""
    import hashlib

    import pipeline.tile as tile_mod

    root, _, mp = release
    calls: list[str] = []
    real = tile_mod.file_sha256
    monkeypatch.setattr(tile_mod, "file_sha256", lambda p: calls.append(str(p)) or real(p))
    td = load_tile(load_manifest(mp), load_manifest(mp).tiles[0])
    assert sorted(calls) == sorted(set(calls)) and len(calls) == len(td.checksums) == len(td.bands)
    for path, digest in td.checksums.items():
        assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
