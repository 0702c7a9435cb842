"""The local disk cache of downloaded adapters, shared by the replicas (processes) of one node.

Data structures: nothing in memory but the settings; everything is on disk under `root`:
- `<root>/<entry>/`: one complete adapter folder per (store URL, adapter name, remote version),
  named by `CacheKey.folder` (the adapter name made path-safe, plus a hash of the three). Its
  mtime is the time of its last use: `fetch` touches it, and eviction reads the LRU order from
  those mtimes. An entry folder is always complete: it appears by one `rename`.
- `<root>/.tmp-*/`: downloads under way, one per fetching thread; renamed into place when
  complete. A process that renames second finds the entry there, drops its copy and uses it.
- `<root>/.trash-*/`: evicted entries being deleted (renamed away first, so that nobody finds a
  half-deleted entry). Stale temp and trash folders (crashed processes) are removed by `evict`.
- `<root>/.locks/<hash>.lock`: one lock file per (store, name), flock'ed while it is fetched, so
  threads and processes that fetch the same adapter download it once; `.locks/evict.lock`
  serializes eviction. Lock files are empty and never deleted (that would race with waiters).

Threads: `fetch` and `evict` may run on any thread of any process on the node. Each lock is
taken through its own open file description, so flock excludes threads of one process as it
excludes processes. `fetch` blocks while a download runs (this one's or another's).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOCKS = ".locks"
STALE_S = 3600.0  # a temp or trash folder untouched this long belongs to a dead process


@dataclass(frozen=True)
class CacheKey:
    """What one entry holds: adapter `name` of the store at `store` (its URL), at `version`
    (the remote's etag, mtime or commit; "" when the store has none)."""

    store: str
    name: str
    version: str = ""

    @property
    def folder(self) -> str:
        """The entry's folder name: readable, and distinct for every (store, name, version)."""
        return f"{self.name.replace('/', '--')[:80]}-{_digest(self.store, self.name, self.version)}"

    @property
    def lock(self) -> str:
        """The lock file's name: one per (store, name), whatever the version."""
        return f"{_digest(self.store, self.name)}.lock"


@dataclass(frozen=True)
class CacheEntry:
    """One complete entry: its folder, bytes of its files, and last use (epoch seconds)."""

    path: Path
    nbytes: int
    last_used: float


@dataclass
class DiskCache:
    """Downloaded adapters under `root`, within `budget` bytes, least recently used evicted first.

    An entry used in the last `keep_recent_s` seconds is not evicted (another replica may be
    reading the folder it was just handed), nor is the one a `fetch` returns, so the cache may
    stay above its budget until those age. The folders are created on the first download."""

    root: Path
    budget: int
    keep_recent_s: float = 10.0

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def fetch(self, key: CacheKey, download: Callable[[Path], None]) -> Path:
        """The entry's folder: touched if cached, else filled by `download(folder)` (which
        writes the adapter's files into the empty folder it is given, raising on failure).
        Evicts others to fit the budget after a download."""
        entry = self.root / key.folder
        if _touch(entry):
            return entry
        (self.root / LOCKS).mkdir(parents=True, exist_ok=True)
        with _flock(self.root / LOCKS / key.lock):
            if _touch(entry):
                return entry
            self._download(key, entry, download)
        self.evict(keep=entry)
        return entry

    def _download(self, key: CacheKey, entry: Path, download: Callable[[Path], None]) -> None:
        """Download into a temp folder beside the entry, then rename it into place."""
        started = time.monotonic()
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            download(temp)
            temp.chmod(0o755)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        try:
            temp.rename(entry)
        except OSError:  # another process, not sharing our locks (NFS), renamed first: use its copy
            shutil.rmtree(temp, ignore_errors=True)
            if not entry.is_dir():
                raise
        _touch(entry)
        logger.info("adapter %r of %s downloaded to %s (%d bytes, %.2f s)", key.name, key.store, entry,
                    _folder_bytes(entry), time.monotonic() - started)

    def entries(self) -> list[CacheEntry]:
        """The complete entries, least recently used first."""
        found = []
        for child in _scandir(self.root):
            if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            try:
                found.append(CacheEntry(Path(child.path), _folder_bytes(Path(child.path)), child.stat().st_mtime))
            except FileNotFoundError:  # evicted meanwhile by a process that ignores our lock
                continue
        return sorted(found, key=lambda entry: entry.last_used)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries (but not `keep`, nor entries used in the last
        `keep_recent_s`) until the cache fits its budget; return the deleted entries' paths."""
        (self.root / LOCKS).mkdir(parents=True, exist_ok=True)
        with _flock(self.root / LOCKS / "evict.lock"):
            entries = self.entries()
            total, now, evicted = sum(entry.nbytes for entry in entries), time.time(), []
            for entry in entries:
                if total <= self.budget:
                    break
                if entry.path == keep or now - entry.last_used < self.keep_recent_s:
                    continue
                self._remove(entry.path)
                total -= entry.nbytes
                evicted.append(entry.path)
            self._remove_stale(now)
        if evicted:
            logger.info("adapter disk cache evicted %d entries, %d bytes left", len(evicted), total)
        return evicted

    def _remove(self, path: Path) -> None:
        """Rename an entry away (it vanishes at once for every reader), then delete it."""
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self, now: float) -> None:
        for child in _scandir(self.root):
            if child.name.startswith((".tmp-", ".trash-")):
                try:
                    stale = now - child.stat().st_mtime > STALE_S
                except FileNotFoundError:
                    continue
                if stale:
                    shutil.rmtree(child.path, ignore_errors=True)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _touch(entry: Path) -> bool:
    """Mark the entry used now; False if there is no such entry."""
    try:
        os.utime(entry)
    except FileNotFoundError:
        return False
    return entry.is_dir()


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as children:
            return list(children)
    except FileNotFoundError:
        return []


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (symlinks not followed)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                continue
    return total


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block."""
    with open(path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
