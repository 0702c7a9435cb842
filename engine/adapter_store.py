"""Adapter stores: where the engine finds adapters by name on first use, and fetches them.

An adapter is a folder holding `adapter_config.json` and a weights file; its name is its path
relative to the store's root with "/" separators ("team-a/support-v2"); on the hub, its repo id
("org/support-v2"). A store is opened from a URL (`open_store`):
- a local folder or file:// URL: `LocalStore`, adapters read in place (no copy);
- hf://org or hf://org/prefix: `HubStore`, the org's model repos (whose name starts with prefix),
  downloaded into the disk cache;
- any other fsspec URL (s3://bucket/prefix, gs://bucket/prefix, memory://...): `FsspecStore`,
  downloaded into the disk cache (engine/adapter_cache.py), keyed by the remote files' version.

Names never leave a store: `check_name` refuses names that are not ADAPTER_NAME
or have empty, "." or ".." components, and `LocalStore` refuses a folder whose real path (symlinks
resolved) is outside the store's real root. Errors: a bad name or a broken adapter folder
(no config or no weights) raise InvalidRequestError (400); a valid name no store holds raises
AdapterNotFoundError (404). Both messages name the adapter.

Data structures: the stores are immutable (a root, a filesystem or hub client, the shared
DiskCache); `StoreSet` holds them in search order and its last listing (`Listing`) behind a lock.

Threads: `fetch` runs on a replica's loader thread (blocking: it may download); `names` and
`contains` may run on any thread (the event loop's, through asyncio.to_thread) at the same time.
The stores keep no mutable state, the DiskCache is safe across threads and processes, and
StoreSet's listing cache is read and replaced under its lock.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fsspec import AbstractFileSystem
from fsspec.core import split_protocol, url_to_fs

from engine.adapter_cache import CacheKey, DiskCache
from engine.errors import AdapterNotFoundError, InvalidRequestError
from engine.config import default_cache_dir

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from engine.config import EngineConfig

logger = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT reads the first one present
HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}
# fields of an fsspec file's info that change when the file does, most telling first
VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified", "updated",
                  "mtime", "created")


class AdapterStore(Protocol):
    """One store of adapters, named by `url` in messages."""

    url: str

    def names(self, limit: int) -> list[str]:
        """Up to `limit` adapter names of the store (a bounded walk; adapters inside an
        adapter's folder are not looked for)."""

    def fetch(self, name: str) -> Path:
        """A local folder holding the adapter's files (blocking: may download). Raises
        InvalidRequestError (bad name, broken adapter) or AdapterNotFoundError."""

    def contains(self, name: str) -> bool:
        """Whether the store holds an adapter `name` (False for bad names)."""


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")  # what may name an adapter, anywhere

def check_name(name: str) -> str:
    """`name` if it can name an adapter inside a store, else InvalidRequestError naming it."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise InvalidRequestError(f"invalid adapter name {name!r}: letters, digits and ._:/- only, "
                                  "starting with a letter or digit, at most 128 characters")
    if any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/")):
        raise InvalidRequestError(f"invalid adapter name {name!r}: empty, '.' or '..' path components "
                                  "(and components starting with '.') are not allowed")
    return name


def is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidRequestError:
        return False
    return True


def _not_found(name: str, url: str) -> AdapterNotFoundError:
    return AdapterNotFoundError(f"adapter {name!r} is not in the adapter store {url}")


def check_files(name: str, url: str, files: Collection[str]) -> str:
    """The weights file PEFT will read, of an adapter folder holding `files`; InvalidRequestError
    ("broken") if the folder has no config or no weights."""
    if CONFIG not in files:
        raise InvalidRequestError(f"adapter {name!r} in {url} is broken: its folder has no {CONFIG}")
    for weights in WEIGHTS:
        if weights in files:
            return weights
    raise InvalidRequestError(f"adapter {name!r} in {url} is broken: its folder has no weights "
                              f"({' or '.join(WEIGHTS)})")


@dataclass(frozen=True)
class LocalStore:
    """Adapters in a folder on this machine, read in place. `root` is the folder's real path."""

    url: str
    root: Path

    @classmethod
    def open(cls, url: str, path: str) -> LocalStore:
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"adapter store {url!r} is not a folder on this machine")
        return cls(url, root)

    def names(self, limit: int) -> list[str]:
        return list(islice(self._walk(self.root, ""), limit))

    def _walk(self, folder: Path, prefix: str) -> Iterator[str]:
        """Adapter names under `folder` (named `prefix`), sorted; symlinked folders are listed
        when they are adapters inside the root, never walked into."""
        try:
            children = sorted(os.scandir(folder), key=lambda child: child.name)
        except OSError:  # vanished or unreadable: nothing to list there
            return
        for child in children:
            name = prefix + child.name
            if not is_valid_name(name) or not child.is_dir():
                continue
            if (Path(child.path) / CONFIG).is_file():
                if self._inside(Path(child.path)):
                    yield name
            elif not child.is_symlink():
                yield from self._walk(Path(child.path), name + "/")

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def folder(self, name: str) -> Path:
        """The real path of `name`'s folder (which may not exist); InvalidRequestError if the
        name is bad or leads outside the store."""
        path = self.root / check_name(name)
        if not self._inside(path):
            raise InvalidRequestError(f"adapter {name!r} leads outside its adapter store {self.url}")
        return path.resolve()

    def fetch(self, name: str) -> Path:
        folder = self.folder(name)
        if not folder.is_dir():
            raise _not_found(name, self.url)
        check_files(name, self.url, {child.name for child in folder.iterdir() if child.is_file()})
        return folder

    def contains(self, name: str) -> bool:
        try:
            return (self.folder(name) / CONFIG).is_file()
        except InvalidRequestError:
            return False


@dataclass(frozen=True)
class FsspecStore:
    """Adapters under `root` (a path as `fs` names it) of an fsspec filesystem, downloaded into
    the disk cache. An entry's version is the remote files' etag (or mtime) and size, so a
    changed adapter is downloaded again; each fetch asks the remote for them (one listing)."""

    url: str
    fs: AbstractFileSystem
    root: str
    cache: DiskCache

    @classmethod
    def open(cls, url: str, protocol: str, cache: DiskCache) -> FsspecStore:
        try:
            fs, root = url_to_fs(url)
        except ImportError as exc:
            package = PACKAGES.get(protocol)
            need = f"the package {package}: pip install {package}" if package else f"its fsspec package ({exc})"
            raise RuntimeError(f"adapter store {url!r} needs {need}") from exc
        except ValueError as exc:
            raise ValueError(f"adapter store {url!r}: unknown protocol {protocol!r} ({exc})") from exc
        return cls(url, fs, root.rstrip("/"), cache)

    def names(self, limit: int) -> list[str]:
        self.fs.invalidate_cache(self.root)  # fsspec caches listings (s3fs for good)
        found: list[str] = []
        for path, dirs, files in self.fs.walk(self.root):
            if len(found) >= limit:
                break
            name = path[len(self.root):].strip("/")
            if name and CONFIG in files:
                found.append(name)
                dirs.clear()  # an adapter's folder is not walked into
            else:
                dirs[:] = sorted(d for d in dirs if is_valid_name(f"{name}/{d}".lstrip("/")))
        return found

    def _files(self, name: str) -> dict[str, dict[str, Any]]:
        """The info of each adapter file in `name`'s folder, fresh from the remote."""
        folder = f"{self.root}/{check_name(name)}"
        self.fs.invalidate_cache(folder)
        try:
            infos = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            raise _not_found(name, self.url) from None
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in infos if info["type"] == "file"}

    def fetch(self, name: str) -> Path:
        files = self._files(name)
        wanted = {file: files[file] for file in (CONFIG, check_files(name, self.url, files))}
        key = CacheKey(self.url, name, remote_version(wanted.values()))
        return self.cache.fetch(key, partial(self._download, wanted))

    def _download(self, files: dict[str, dict[str, Any]], folder: Path) -> None:
        for file, info in files.items():
            self.fs.get_file(info["name"], str(folder / file))

    def contains(self, name: str) -> bool:
        return is_valid_name(name) and self.fs.isfile(f"{self.root}/{name}/{CONFIG}")


def remote_version(infos: Collection[dict[str, Any]]) -> str:
    """What changes when any of the files (fsspec info dicts) does: name, size and etag/mtime."""
    parts = []
    for info in sorted(infos, key=lambda info: info["name"]):
        tag = next((str(info[key]) for key in VERSION_FIELDS if info.get(key) is not None), "")
        parts.append(f"{info['name']}:{info.get('size')}:{tag}")
    return "|".join(parts)


@dataclass(frozen=True)
class HubStore:
    """The model repos of a Hugging Face hub `org` whose name starts with `prefix`, that hold an
    adapter at their top level; named by repo id ("org/name"). Downloaded into the disk cache,
    keyed by the repo's commit sha; each fetch asks the hub for the repo's info (one call)."""

    url: str
    org: str
    prefix: str
    cache: DiskCache
    api: HfApi

    @classmethod
    def open(cls, url: str, path: str, cache: DiskCache, hf_token: str | None) -> HubStore:
        from huggingface_hub import HfApi

        org, _, prefix = path.strip("/").partition("/")
        if not HUB_REPO.match(org) or (prefix and not HUB_REPO.match(prefix)):
            raise ValueError(f"adapter store {url!r}: expected hf://org or hf://org/name-prefix")
        return cls(url, org, prefix, cache, HfApi(token=hf_token))

    def names(self, limit: int) -> list[str]:
        found = []
        for model in self.api.list_models(author=self.org, search=self.prefix or None, expand=["siblings"]):
            if len(found) >= limit:
                break
            files = {sibling.rfilename for sibling in model.siblings or ()}
            if self._holds(model.id) and CONFIG in files:
                found.append(model.id)
        return found

    def _holds(self, name: str) -> bool:
        """Whether `name` is a repo id this store may hold (no hub call)."""
        org, _, repo = name.partition("/")
        return org == self.org and bool(HUB_REPO.match(repo)) and repo.startswith(self.prefix)

    def fetch(self, name: str) -> Path:
        from huggingface_hub.errors import RepositoryNotFoundError

        if not self._holds(check_name(name)):
            raise _not_found(name, self.url)
        try:
            info = self.api.model_info(name)
        except RepositoryNotFoundError:
            raise _not_found(name, self.url) from None
        files = {sibling.rfilename for sibling in info.siblings or ()}
        wanted = [CONFIG, check_files(name, self.url, files)]
        key = CacheKey(self.url, name, info.sha or "")
        return self.cache.fetch(key, partial(self._download, name, info.sha, wanted))

    def _download(self, repo: str, revision: str | None, files: list[str], folder: Path) -> None:
        self.api.snapshot_download(repo, revision=revision, allow_patterns=files, local_dir=folder)
        shutil.rmtree(folder / ".cache", ignore_errors=True)  # the hub's download bookkeeping

    def contains(self, name: str) -> bool:
        return is_valid_name(name) and self._holds(name) and self.api.file_exists(name, CONFIG)


def open_store(url: str, cache: DiskCache, hf_token: str | None = None) -> AdapterStore:
    """The store a URL names (see the module docstring). Raises ValueError for a bad URL or a
    missing local folder, RuntimeError naming the package to install for a protocol whose
    fsspec package is missing."""
    protocol, path = split_protocol(url)
    if protocol in (None, "file"):
        return LocalStore.open(url, path)
    if protocol == "hf":
        return HubStore.open(url, path, cache, hf_token)
    return FsspecStore.open(url, protocol, cache)


@dataclass(frozen=True)
class Listing:
    """Names listed at `at` (StoreSet's clock) with `limit`: complete if fewer than `limit`."""

    at: float
    limit: int
    names: list[str]

    def answers(self, limit: int, now: float, ttl: float) -> bool:
        fresh = now - self.at < ttl
        return fresh and (limit <= self.limit or len(self.names) < self.limit)


@dataclass
class StoreSet:
    """The engine's stores, searched in order: the first that holds a name wins."""

    stores: list[AdapterStore]
    listing_ttl_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _listing: Listing | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, config: EngineConfig, listing_ttl_s: float = 5.0) -> StoreSet:
        """The stores of `config.adapter_stores`, sharing one DiskCache of `adapter_disk_cache`
        bytes under `adapter_cache_dir` (default <cache_dir or ~/.cache/lora-serve>/adapters)."""
        cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
        root = Path(config.adapter_cache_dir).expanduser() if config.adapter_cache_dir else cache_root / "adapters"
        cache = DiskCache(root, int(config.adapter_disk_cache))
        return cls([open_store(url, cache, config.hf_token) for url in config.adapter_stores], listing_ttl_s)

    @property
    def urls(self) -> list[str]:
        return [store.url for store in self.stores]

    def fetch(self, name: str) -> Path:
        """The adapter's local folder from the first store that holds it (blocking). Raises
        InvalidRequestError (bad name, broken adapter) or AdapterNotFoundError."""
        check_name(name)
        for store in self.stores:
            try:
                return store.fetch(name)
            except AdapterNotFoundError:
                continue
        logger.info("adapter %r is in none of the stores %s", name, ", ".join(self.urls) or "(none configured)")
        raise AdapterNotFoundError(f"adapter {name!r} is not in any adapter store")  # clients see no paths

    def contains(self, name: str) -> bool:
        """Whether a store holds `name` (a stat per local store; remote stores ask the remote)."""
        return is_valid_name(name) and any(store.contains(name) for store in self.stores)

    def names(self, limit: int = 1000) -> list[str]:
        """Up to `limit` adapter names, in store order without repeats; the answer may be up to
        `listing_ttl_s` old. A store whose listing fails is left out (and logged)."""
        with self._lock:
            listing = self._listing
            if listing is None or not listing.answers(limit, self.clock(), self.listing_ttl_s):
                listing = self._listing = Listing(self.clock(), limit, self._list(limit))
            return listing.names[:limit]

    def _list(self, limit: int) -> list[str]:
        found: dict[str, None] = {}
        for store in self.stores:
            try:
                names = store.names(limit)
            except Exception:  # a listing is advisory: show the other stores' adapters
                logger.warning("listing adapter store %s failed", store.url, exc_info=True)
                continue
            for name in names:
                if len(found) >= limit:
                    return list(found)
                found.setdefault(name)
        return list(found)


def open_stores(config: EngineConfig) -> StoreSet | None:
    """The config's stores, or None when it names none."""
    return StoreSet.from_config(config) if config.adapter_stores else None
