"""Pixel planes kept in an unnamed file on the worker's local disk rather than in its heap.

A 2048² × 6-band tile is ~226 MB of planes (image, weight, bad) that every stage reads, but most
stages read one band at a time. Held in the heap, all of it is resident from the FITS read to the
last cutout, under every stage's own working set. Backed by a file mapping (``MAP_SHARED``), a
plane's pages can be handed back with ``madvise(MADV_DONTNEED)`` once a band is done: its contents
stay in the page cache (clean or dirty, never lost) and come back on the next touch as minor faults,
while the kernel may write them out and reclaim them under memory pressure. Measured on a 2048² × 6
tile, the resident floor between stages dropped from 430 to 214 MB at the same run time. Stage
products that are whole planes (the artefact stage's masks, 48 MB more) use the same mechanism
(:func:`plane_file`), and the runner hands their pages back between stages too.

The file is unnamed (``O_TMPFILE``, or unlinked at once), so a killed worker leaves nothing behind;
its blocks are reserved up front (``posix_fallocate``), so a full disk is found before any pixel is
written rather than as a SIGBUS later. ``SURVEYPIPE_SCRATCH`` names the directory (default: the
system's temporary directory); ``memory`` (or ``0``/``off``) keeps the planes in the heap. A
directory on a RAM file system (tmpfs) is not used, since its pages would be RAM anyway.
"""
from __future__ import annotations

import logging
import mmap
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds

log = logging.getLogger(__name__)
T = TypeVar("T")

SCRATCH_ENV = "SURVEYPIPE_SCRATCH"
PAGE = mmap.PAGESIZE
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
IN_MEMORY = frozenset({"", "0", "off", "memory", "none"})


def scratch_dir() -> Path | None:
    """Where planes go (``SURVEYPIPE_SCRATCH``), or None for planes in the heap."""
    value = os.environ.get(SCRATCH_ENV)
    if value is not None and value.strip().lower() in IN_MEMORY:
        return None
    d = Path(value) if value else Path(tempfile.gettempdir())
    fs = filesystem_type(d)
    if fs in RAM_FILESYSTEMS:
        log.debug("scratch %s is on %s (RAM): pixel planes stay in the heap", d, fs)
        return None
    return d


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (longest mount point in /proc/mounts), if known."""
    try:
        target = os.path.realpath(path)
        best, kind = "", None
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
        return kind
    except OSError:
        return None


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def plane_bytes(shape: tuple[int, ...], dtype: np.dtype | type) -> int:
    """Bytes a plane takes in a :class:`PlaneFile` (whole pages)."""
    return _round_up(int(np.prod(shape)) * np.dtype(dtype).itemsize)


class PlaneFile:
    """One unnamed, preallocated scratch file mapped ``MAP_SHARED``; :meth:`take` carves page-aligned planes."""

    def __init__(self, directory: Path, nbytes: int):
        nbytes = max(_round_up(nbytes), PAGE)
        if not hasattr(os, "posix_fallocate") or not hasattr(mmap, "MADV_DONTNEED"):
            raise OSError("this platform cannot reserve a file's blocks or hand mapped pages back")
        fd = self._open(directory)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now, not SIGBUS on a later write
            self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the file alive; it goes with the last plane
        self.size = nbytes
        self.used = 0

    @staticmethod
    def _open(directory: Path) -> int:
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (AttributeError, OSError):  # no O_TMPFILE (platform or file system): create and unlink
            fd, name = tempfile.mkstemp(prefix="surveypipe-planes-", dir=directory)
            os.unlink(name)
            return fd

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A zero-initialised plane backed by the file (page-aligned, so its pages are its own)."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        if self.used + n > self.size:
            raise ValueError(f"scratch file full: {self.used + n} > {self.size} bytes")
        a = np.frombuffer(self.map, dt, int(np.prod(shape)), self.used).reshape(shape)
        self.used += _round_up(n)
        return a


def plane_file(nbytes: int, what: str, directory: Path | None | bool = True) -> PlaneFile | None:
    """A :class:`PlaneFile` of ``nbytes`` in ``directory`` (True: :func:`scratch_dir`), or None for the
    heap: where no scratch is configured, or where the file cannot be made (a warning names ``what``)."""
    d = scratch_dir() if directory is True else (directory or None)
    if d is None:
        return None
    try:
        return PlaneFile(d, nbytes)
    except OSError as exc:
        log.warning("%s: no scratch file in %s (%s); the planes stay in memory", what, d, exc)
        return None


def zeros(store: PlaneFile | None, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zero plane from ``store``, or from the heap where there is none."""
    return store.take(shape, dtype) if store is not None else np.zeros(shape, dtype)


def _backing_map(a: np.ndarray) -> mmap.mmap | None:
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def release(*planes: np.ndarray | None) -> None:
    """Hand the resident pages of file-backed ``planes`` back (contents kept); other arrays: no-op.

    Call it when a band is done with; the next read of the plane faults its pages back in."""
    for a in planes:
        if not isinstance(a, np.ndarray) or a.size == 0:
            continue
        mm = _backing_map(a)
        if mm is None:
            continue
        start0 = np.frombuffer(mm, np.uint8, 1, 0).ctypes.data
        lo, hi = byte_bounds(a)
        start = (lo - start0) // PAGE * PAGE
        stop = min(_round_up(hi - start0), len(mm))
        if stop > start:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def released_after_each(items: Iterable[T], planes: Callable[[T], Iterable[np.ndarray | None]]) -> Iterator[T]:
    """Loop over ``items`` (bands), handing back ``planes(item)``'s pages once the loop body is done with it
    (also after a ``continue``): ``for b in released_after_each(bands, lambda b: (img[b], wt[b])):``."""
    for item in items:
        try:
            yield item
        finally:
            release(*planes(item))

