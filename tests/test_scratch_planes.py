"""File-backed pixel planes: contents kept, resident pages handed back, the heap as the fallback."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_release
from helpers_stages import CLASSICAL
from pipeline import scratch
from pipeline.config import PipelineConfig
from pipeline.manifest import load_manifest
from pipeline.rss import status_mb
from pipeline.runner import process_tile
from pipeline.scratch import PlaneFile, release, released_after_each
from pipeline.store import CatalogStore
from pipeline.tile import load_tile

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")


def resident_mapped_mb() -> float:
    """File-backed plus shared-memory resident pages (a scratch on tmpfs shows up as the latter)."""
    return (status_mb("RssFile") or 0.0) + (status_mb("RssShmem") or 0.0)


@linux_only
def test_released_plane_leaves_the_resident_set_and_keeps_its_values(tmp_path):
    pf = PlaneFile(tmp_path, 64 * 2**20)
    a = pf.take((4096, 4096), np.float32)  # 64 MiB
    a[...] = np.arange(4096, dtype=np.float32)[None, :]
    touched = resident_mapped_mb()
    release(a)
    after = resident_mapped_mb()
    assert touched - after > 50, (touched, after)
    assert a[123, 4095] == 4095.0 and float(a.sum(dtype=np.float64)) == 4096 * (4095 * 4096 / 2)


def test_planes_are_page_aligned_and_disjoint(tmp_path):
    pf = PlaneFile(tmp_path, scratch.plane_bytes((3, 5), np.bool_) + scratch.plane_bytes((7, 7), np.float32))
    b = pf.take((3, 5), np.bool_)
    f = pf.take((7, 7), np.float32)
    b[...] = True
    f[...] = -1.0
    release(b)  # rounding a release outward to whole pages must not touch the next plane's values
    assert b.all() and (f == -1.0).all()
    assert (f.ctypes.data - b.ctypes.data) % scratch.PAGE == 0
    with pytest.raises(ValueError, match="scratch file full"):
        pf.take((2, 2), np.float64)


def test_release_ignores_heap_arrays_and_none():
    a = np.ones(1000, np.float32)
    release(a, None, a[::2])
    assert a.sum() == 1000


def test_released_after_each_hands_back_after_continue(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(scratch, "release", lambda *planes: seen.extend(p for p in planes if p is not None))
    done = []
    for b in released_after_each(["g", "r", "i"], lambda b: (b,)):
        if b == "r":
            assert seen == ["g"]
            continue
        done.append(b)
    assert seen == ["g", "r", "i"] and done == ["g", "i"]


def test_scratch_dir_follows_the_environment(monkeypatch, tmp_path):
    for off in ("memory", "0", "off"):
        monkeypatch.setenv(scratch.SCRATCH_ENV, off)
        assert scratch.scratch_dir() is None
    monkeypatch.setenv(scratch.SCRATCH_ENV, str(tmp_path))
    if scratch.filesystem_type(tmp_path) not in scratch.RAM_FILESYSTEMS:
        assert scratch.scratch_dir() == tmp_path


@pytest.mark.skipif(scratch.filesystem_type(Path("/dev/shm")) != "tmpfs", reason="no tmpfs at /dev/shm")
def test_a_scratch_on_tmpfs_is_not_used(monkeypatch):
    monkeypatch.setenv(scratch.SCRATCH_ENV, "/dev/shm")
    assert scratch.scratch_dir() is None  # its pages would be RAM: no gain, only a lower-looking RSS


def test_file_backed_tile_equals_the_heap_tile(tiny_release, tmp_path):
    manifest, _ = tiny_release
    m = load_manifest(manifest)
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    heap = load_tile(m, m.tiles[0], scratch=None)
    mapped = load_tile(m, m.tiles[0], scratch=scratch_dir)
    for plane in ("image", "weight", "bad"):
        for b in heap.bands:
            h, f = getattr(heap, plane)[b], getattr(mapped, plane)[b]
            assert scratch._backing_map(f) is not None and scratch._backing_map(h) is None
            assert f.dtype == h.dtype and f.flags.writeable and np.array_equal(f, h)
    mapped.release_pages()
    assert np.array_equal(mapped.image[heap.bands[0]], heap.image[heap.bands[0]])
    assert not list(scratch_dir.iterdir())  # the file is unnamed: nothing left behind


def test_a_full_scratch_disk_falls_back_to_the_heap(tiny_release, tmp_path, monkeypatch, caplog):
    manifest, _ = tiny_release
    m = load_manifest(manifest)

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    tile = load_tile(m, m.tiles[0], scratch=tmp_path)
    assert scratch._backing_map(tile.image[tile.bands[0]]) is None
    assert "pixel planes" in caplog.text and "stay in memory" in caplog.text and "t0000" in caplog.text


def test_catalogue_is_identical_with_planes_in_the_heap_or_on_disk(tmp_path, monkeypatch):
    manifest, _ = make_release(tmp_path / "release", n_tiles=1, size=160, bands=("g", "r", "i"), n_src=20)
    m = load_manifest(manifest)
    tables = {}
    for mode in ("memory", str(tmp_path)):
        monkeypatch.setenv(scratch.SCRATCH_ENV, mode)
        out = tmp_path / f"out-{len(tables)}"
        assert process_tile(m, "t0000", PipelineConfig(stages=CLASSICAL), str(out))["status"] == "complete"
        tables[mode] = CatalogStore(out).read_product("t0000", "objects")
    a, b = tables.values()
    assert len(a) > 10 and list(a) == list(b)
    for c in a:
        assert np.array_equal(np.asarray(a[c]), np.asarray(b[c]), equal_nan=np.asarray(a[c]).dtype.kind == "f"), c


@linux_only
def test_artefact_masks_live_in_the_scratch_and_equal_the_heap_masks(tmp_path, monkeypatch):
    from stages.artefacts import Artefacts, ArtefactsConfig

    manifest, _ = make_release(tmp_path / "release", n_tiles=1, size=256, bands=("g", "r"), n_src=20)
    m = load_manifest(manifest)
    masks = {}
    for mode in ("memory", str(tmp_path)):
        monkeypatch.setenv(scratch.SCRATCH_ENV, mode)
        tile = load_tile(m, m.tiles[0])
        out = Artefacts().run({"exposure": tile}, ArtefactsConfig(device="cpu"))["masks/artefacts"].planes
        masks[mode] = out
    heap, disk = masks.values()
    assert all(scratch._backing_map(p) is None for p in heap.values())
    assert all(scratch._backing_map(p) is not None for p in disk.values())
    for b in heap:
        assert disk[b].dtype == np.uint16 and np.array_equal(heap[b], disk[b]), b
