"""Adapter stores (engine/adapter_store.py) and the disk cache (engine/adapter_cache.py).

Stores are local folders, file:// URLs and fsspec's in-memory filesystem standing in for a
remote one (memory:// exercises the download path and the cache without network); the hub
store runs against a fake HfApi. Adapter folders hold the files of a fixture adapter.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import httpx2
import pytest
from huggingface_hub.errors import RepositoryNotFoundError
from peft import LoraConfig

from engine.adapter_cache import CacheKey, DiskCache
from engine.adapter_store import FsspecStore, HubStore, LocalStore, StoreSet, open_store
from engine.config import EngineConfig
from engine.errors import AdapterNotFoundError, InvalidRequestError

FILES = ("adapter_config.json", "adapter_model.safetensors")
BAD_NAMES = ["../x", "/abs", "a/../../b", "a\\b", "a//b", "a/", "./a", "a/./b", "a/.hidden", "", "a b", "x" * 200]


@pytest.fixture(scope="module")
def adapter_files(adapter_dirs) -> dict[str, bytes]:
    """The files of a real PEFT adapter (config and safetensors weights)."""
    return {name: (adapter_dirs["alpha"] / name).read_bytes() for name in FILES}


def put(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


@pytest.fixture
def store_root(tmp_path, adapter_files) -> Path:
    """A local store: nested adapters, an adapter inside an adapter, a hidden and a plain folder."""
    root = tmp_path / "store"
    for name in ("alpha", "team-a/support-v2", "team-a/deep/x", "team-b/y", "alpha/inner", ".hidden/z"):
        put(root, name, adapter_files)
    (root / "notes").mkdir()
    return root


@pytest.fixture
def cache(tmp_path) -> DiskCache:
    return DiskCache(tmp_path / "cache", budget=2**30)


@pytest.fixture
def memory_store(adapter_files, cache):
    """A "remote" store in fsspec's memory filesystem, holding team/x and team/y."""
    root = f"memory://store-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name in ("team/x", "team/y"):
        for file, data in adapter_files.items():
            fs.pipe(f"{root}/{name}/{file}", data)
    store = open_store(root, cache)
    yield store
    fs.rm(store.root, recursive=True)


def count_downloads(monkeypatch, store: FsspecStore) -> list[str]:
    downloads: list[str] = []
    get_file = store.fs.get_file

    def counting(rpath: str, lpath: str, **kwargs) -> None:
        downloads.append(rpath)
        get_file(rpath, lpath, **kwargs)

    monkeypatch.setattr(store.fs, "get_file", counting)
    return downloads


def test_local_store_lists_nested_adapters_not_inside_adapters(store_root):
    store = open_store(str(store_root), cache=None)
    assert isinstance(store, LocalStore)
    assert store.names(100) == ["alpha", "team-a/deep/x", "team-a/support-v2", "team-b/y"]
    assert store.names(2) == ["alpha", "team-a/deep/x"]
    assert open_store(f"file://{store_root}", cache=None).names(100) == store.names(100)


def test_local_store_fetches_in_place(store_root, cache):
    stores = StoreSet([open_store(f"file://{store_root}", cache)])
    folder = stores.fetch("team-a/support-v2")
    assert folder == (store_root / "team-a/support-v2").resolve()
    assert LoraConfig.from_pretrained(folder).r == 8
    assert not cache.root.exists()  # nothing copied
    assert stores.contains("team-a/support-v2") and not stores.contains("team-a")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_cannot_escape_the_store(store_root, memory_store, name):
    stores = StoreSet([open_store(str(store_root / "team-a"), None), memory_store])
    with pytest.raises(InvalidRequestError, match="invalid adapter name") as error:
        stores.fetch(name)
    assert not isinstance(error.value, AdapterNotFoundError) and repr(name)[:40] in str(error.value)
    for store in stores.stores:
        with pytest.raises(InvalidRequestError, match="invalid adapter name"):
            store.fetch(name)
    assert not stores.contains(name)


def test_symlink_out_of_the_store_is_refused(tmp_path, store_root, adapter_files):
    outside = put(tmp_path / "elsewhere", "secret", adapter_files)
    (store_root / "evil").symlink_to(outside)
    (store_root / "team-b" / "evil-parent").symlink_to(outside.parent)
    (store_root / "alias").symlink_to(store_root / "team-b/y")  # inside the root: fine
    store = open_store(str(store_root), None)
    for name in ("evil", "team-b/evil-parent/secret"):
        with pytest.raises(InvalidRequestError, match="outside") as error:
            store.fetch(name)
        assert repr(name) in str(error.value)
        assert not store.contains(name)
    assert "evil" not in store.names(100) and "alias" in store.names(100)
    assert store.fetch("alias") == (store_root / "team-b/y").resolve()


def test_missing_adapter_is_404_naming_it_but_not_the_stores(store_root, memory_store):
    """The message reaches clients: it names the adapter, never the server's paths or buckets."""
    stores = StoreSet([open_store(str(store_root), None), memory_store])
    for name in ("nope", "team-a/nope", "team/nope"):
        with pytest.raises(AdapterNotFoundError) as error:
            stores.fetch(name)
        assert repr(name) in str(error.value)
        assert str(store_root) not in str(error.value) and memory_store.url not in str(error.value)
    with pytest.raises(AdapterNotFoundError, match="'alpha' is not in any adapter store"):
        StoreSet([]).fetch("alpha")


def test_broken_adapter_folders_are_400(store_root, memory_store, adapter_files):
    put(store_root, "no-weights", {"adapter_config.json": adapter_files["adapter_config.json"]})
    memory_store.fs.pipe(f"{memory_store.root}/team/noconfig/adapter_model.safetensors", b"x")
    stores = StoreSet([open_store(str(store_root), None), memory_store])
    for name, problem in [("notes", "no adapter_config.json"), ("team-a", "no adapter_config.json"),
                          ("no-weights", "no weights"), ("team/noconfig", "no adapter_config.json")]:
        with pytest.raises(InvalidRequestError, match="broken") as error:
            stores.fetch(name)
        assert not isinstance(error.value, AdapterNotFoundError)
        assert repr(name) in str(error.value) and problem in str(error.value)


def test_remote_adapter_is_downloaded_once_then_cached(monkeypatch, memory_store, adapter_files):
    downloads = count_downloads(monkeypatch, memory_store)
    folder = memory_store.fetch("team/x")
    assert folder.parent == memory_store.cache.root
    assert {file.name: file.read_bytes() for file in folder.iterdir()} == adapter_files
    assert LoraConfig.from_pretrained(folder).r == 8
    assert len(downloads) == 2
    assert memory_store.fetch("team/x") == folder and len(downloads) == 2  # a hit: no download
    assert memory_store.names(10) == ["team/x", "team/y"]
    assert memory_store.contains("team/y") and not memory_store.contains("team/z")


def test_changed_remote_adapter_is_downloaded_again(memory_store):
    first = memory_store.fetch("team/x")
    time.sleep(0.01)
    memory_store.fs.pipe(f"{memory_store.root}/team/x/adapter_model.safetensors", b"new weights")
    second = memory_store.fetch("team/x")
    assert second != first and (second / "adapter_model.safetensors").read_bytes() == b"new weights"


def writer(nbytes: int, calls: list[Path] | None = None, delay: float = 0.0):
    """A download function that writes one file of `nbytes` bytes."""
    def download(folder: Path) -> None:
        if calls is not None:
            calls.append(folder)
        time.sleep(delay)
        (folder / "adapter_model.safetensors").write_bytes(b"w" * nbytes)
    return download


def test_lru_eviction_by_bytes(tmp_path):
    cache = DiskCache(tmp_path / "cache", budget=2500, keep_recent_s=0.0)
    paths = {name: cache.fetch(CacheKey("s://", name), writer(1000)) for name in "abc"}
    assert not paths["a"].exists()  # three entries of 1000 bytes don't fit 2500
    for age, name in [(30, "b"), (20, "c")]:
        os.utime(paths[name], (time.time() - age,) * 2)
    assert cache.fetch(CacheKey("s://", "b"), writer(1000)) == paths["b"]  # a hit makes b recent
    paths["d"] = cache.fetch(CacheKey("s://", "d"), writer(1000))
    assert [entry.path for entry in cache.entries()] == [paths["b"], paths["d"]]
    assert sum(entry.nbytes for entry in cache.entries()) == 2000


def test_returned_and_recent_entries_are_never_evicted(tmp_path):
    cache = DiskCache(tmp_path / "cache", budget=500, keep_recent_s=60.0)
    first = cache.fetch(CacheKey("s://", "a"), writer(1000))
    second = cache.fetch(CacheKey("s://", "b"), writer(1000))
    assert first.exists() and second.exists()  # both used within keep_recent_s
    os.utime(first, (time.time() - 120,) * 2)
    assert cache.evict(keep=second) == [first] and second.exists()  # over budget, but returned


def test_concurrent_fetches_share_one_download(tmp_path):
    cache = DiskCache(tmp_path / "cache", budget=2**20)
    calls: list[Path] = []
    results: list[Path] = []
    key = CacheKey("s://", "team/x", "v1")
    threads = [threading.Thread(target=lambda: results.append(cache.fetch(key, writer(100, calls, 0.1))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results[0] == results[1]
    assert (results[0] / "adapter_model.safetensors").stat().st_size == 100
    assert [child.name for child in cache.root.iterdir() if child.name.startswith(".tmp")] == []


def test_a_process_that_renamed_first_wins(tmp_path):
    cache = DiskCache(tmp_path / "cache", budget=2**20)
    key = CacheKey("s://", "x")

    def race(folder: Path) -> None:  # another process (not sharing our lock) finishes first
        writer(7)(folder)
        (cache.root / key.folder).mkdir()
        writer(5)(cache.root / key.folder)

    entry = cache.fetch(key, race)
    assert (entry / "adapter_model.safetensors").stat().st_size == 5
    assert [child.name for child in cache.root.iterdir() if not child.name.startswith(".locks")] == [key.folder]


def test_failed_download_leaves_nothing(tmp_path):
    cache = DiskCache(tmp_path / "cache", budget=2**20)

    def fail(folder: Path) -> None:
        writer(10)(folder)
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        cache.fetch(CacheKey("s://", "x"), fail)
    assert cache.entries() == [] and [p.name for p in cache.root.iterdir()] == [".locks"]


def test_stale_temp_folders_are_removed(tmp_path):
    cache = DiskCache(tmp_path / "cache", budget=2**20)
    stale, fresh = cache.root / ".tmp-dead", cache.root / ".tmp-running"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200,) * 2)
    cache.evict()
    assert not stale.exists() and fresh.exists()


def test_store_set_merges_in_order_and_caches_the_listing(tmp_path, store_root, adapter_files, cache):
    other = tmp_path / "other"
    put(other, "alpha", adapter_files)
    put(other, "zeta", adapter_files)
    now = [0.0]
    stores = StoreSet([open_store(str(store_root), cache), open_store(str(other), cache)], clock=lambda: now[0])
    assert stores.names() == ["alpha", "team-a/deep/x", "team-a/support-v2", "team-b/y", "zeta"]
    assert stores.names(3) == ["alpha", "team-a/deep/x", "team-a/support-v2"]
    assert stores.fetch("alpha") == (store_root / "alpha").resolve()  # the first store wins
    assert stores.fetch("zeta") == (other / "zeta").resolve()
    put(other, "new", adapter_files)
    now[0] = 4.9
    assert "new" not in stores.names()  # within the TTL
    now[0] = 5.1
    assert "new" in stores.names()


def test_store_set_listing_is_bounded_and_thread_safe(tmp_path, adapter_files):
    root = tmp_path / "many"
    for index in range(30):
        put(root, f"a{index:02d}", adapter_files)
    stores = StoreSet([open_store(str(root), None)], listing_ttl_s=0.0)
    assert stores.names(10) == [f"a{index:02d}" for index in range(10)]
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.extend(stores.names(20) for _ in range(5))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20 and all(names == [f"a{index:02d}" for index in range(20)] for names in results)


def test_a_failing_store_is_left_out_of_the_listing(store_root, caplog):
    class Down:
        url = "s3://down"

        def names(self, limit: int) -> list[str]:
            raise OSError("no route to host")

    stores = StoreSet([Down(), open_store(str(store_root), None)])
    assert stores.names()[0] == "alpha" and "s3://down" in caplog.text


@pytest.mark.parametrize(("url", "package"), [("s3://bucket/adapters", "s3fs"), ("gs://bucket/adapters", "gcsfs")])
def test_missing_fsspec_package_is_named(monkeypatch, cache, url, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, url.split(":")[0], raising=False)
    with pytest.raises(RuntimeError, match=f"needs the package {package}: pip install {package}"):
        open_store(url, cache)


@pytest.mark.parametrize("url", ["nope://x", "/no/such/folder", "hf://", "hf://org/a/b"])
def test_bad_store_urls_fail_at_start(cache, url):
    with pytest.raises(ValueError, match="adapter store"):
        open_store(url, cache)


class FakeHub:
    """The HfApi calls HubStore makes, over repos held as {repo id: (sha, {file: bytes})}."""

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        self.repos, self.downloads = repos, []

    def list_models(self, author: str, search: str | None, expand: list[str]):
        for repo, (_, files) in self.repos.items():
            if repo.startswith(f"{author}/") and (search or "") in repo:
                yield SimpleNamespace(id=repo, siblings=[SimpleNamespace(rfilename=file) for file in files])

    def model_info(self, repo: str):
        if repo not in self.repos:
            request = httpx2.Request("GET", f"https://hub.invalid/api/models/{repo}")
            raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=request))
        sha, files = self.repos[repo]
        return SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=file) for file in files])

    def snapshot_download(self, repo: str, revision: str, allow_patterns: list[str], local_dir: Path) -> str:
        sha, files = self.repos[repo]
        assert revision == sha
        self.downloads.append((repo, sorted(allow_patterns)))
        put(Path(local_dir), "", {file: files[file] for file in allow_patterns})
        put(Path(local_dir), ".cache/huggingface", {"x.metadata": b"bookkeeping"})
        return str(local_dir)

    def file_exists(self, repo: str, filename: str) -> bool:
        return repo in self.repos and filename in self.repos[repo][1]


def test_hub_store(cache, adapter_files):
    hub = FakeHub({
        "org/lora-a": ("sha1", {**adapter_files, "README.md": b"card"}),
        "org/lora-broken": ("sha1", {"adapter_model.safetensors": b"x"}),
        "org/base-model": ("sha1", adapter_files),  # outside the prefix
        "org/lora-model": ("sha1", {"config.json": b"{}"}),
        "other/lora-b": ("sha1", adapter_files),
    })
    store = HubStore("hf://org/lora-", "org", "lora-", cache, hub)
    assert store.names(10) == ["org/lora-a"]
    folder = store.fetch("org/lora-a")
    assert sorted(path.name for path in folder.iterdir()) == sorted(FILES)  # no README, no .cache
    assert store.fetch("org/lora-a") == folder and hub.downloads == [("org/lora-a", sorted(FILES))]
    hub.repos["org/lora-a"] = ("sha2", adapter_files)  # a new commit is fetched again
    assert store.fetch("org/lora-a") != folder and len(hub.downloads) == 2
    for name in ("org/lora-nope", "other/lora-b", "org/base-model"):
        with pytest.raises(AdapterNotFoundError, match=repr(name)):
            store.fetch(name)
    for name in ("org/lora-broken", "org/lora-model"):
        with pytest.raises(InvalidRequestError, match="broken") as error:
            store.fetch(name)
        assert not isinstance(error.value, AdapterNotFoundError)
    assert store.contains("org/lora-a") and not store.contains("other/lora-b")


def test_store_set_from_config(tmp_path, store_root):
    config = EngineConfig(cache_dir=str(tmp_path / "c"), adapter_stores=[str(store_root), "hf://org"],
                          adapter_disk_cache="1MiB")
    stores = StoreSet.from_config(config)
    assert stores.urls == [str(store_root), "hf://org"]
    assert stores.stores[1].cache.root == tmp_path / "c" / "adapters" and stores.stores[1].cache.budget == 2**20
    custom = StoreSet.from_config(config.model_copy(update={"adapter_cache_dir": str(tmp_path / "d")}))
    assert custom.stores[1].cache.root == tmp_path / "d"
    shutil.rmtree(tmp_path / "c", ignore_errors=True)
