"""Starting and stopping the servers the HTTP benchmarks measure, each in one place.

- `serve_app`: our Ray Serve application (deployments/app.py) in a private local Ray
  instance in this process, started as the tests start it (deployments/local.py);
  `diagnostics` reads its LLM replica's state through a handle.
- `uvicorn_thread`: an ASGI app of the benchmark's own (a baseline, a relay) on a free port.
- `transformers_serve`: `transformers serve --continuous-batching` as a subprocess on the
  checkpoint folder our loader uses for the same model, with the same dtype and device,
  offline (HF_HUB_OFFLINE=1); stopped by its PID and its children's, never by name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from bench.client import Endpoint
from client.servers import free_port, wait_until_healthy
from deployments.contract.settings import AppArgs
from deployments.local import ROOT, WORKER_NICENESS, local_app, local_ray
from engine.loader import resolve_checkpoint, resolve_device, resolve_dtype

log = logging.getLogger("bench.systems")

SERVE_CONFIG = ROOT / "serve_config.yaml"
SETTLE_TIMEOUT_S = 60.0  # longest wait for Ray's processes to end after ray.shutdown()
DIAGNOSTICS_TIMEOUT_S = 60.0
TRANSFORMERS_PAGE_SIZE = 256  # tokens per block of its KV cache (ContinuousBatchingConfig.page_size default)
START_TIMEOUT_S = 300.0  # longest wait for transformers serve to load the model and answer /health
STOP_TIMEOUT_S = 30.0  # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 30
# transformers serve rejects `ignore_eos` (HTTP 422). Its continuous batching takes a
# request's eos_token_id from the request's generation config, and -1 means "no EOS": a
# `generation_config` JSON field (which replaces the model's generation config) with it
# makes a request run to max_tokens, as ignore_eos does for ours.
TRANSFORMERS_IGNORE_EOS = {"generation_config": json.dumps({"eos_token_id": -1})}


# ----- our Serve application ----------------------------------------------------------------


def config_app_args(config: Path) -> dict[str, Any]:
    """The args of the first application in a serve config file."""
    return dict(yaml.safe_load(config.read_text())["applications"][0].get("args") or {})


def our_endpoint(url: str, values: dict[str, Any]) -> Endpoint:
    """Our application (or a baseline with its API) at `url`, asked for the app's base model."""
    return Endpoint(url, AppArgs.model_validate(values).model_name)


@contextmanager
def serve_app(values: dict[str, Any], ray_logs: bool, worker_niceness: int = WORKER_NICENESS) -> Iterator[str]:
    """A private local Ray instance running the application; yields its base URL.

    Serve and Ray are shut down on exit, and Ray's processes have ended (or a warning says
    which have not), so they use no CPU during whatever runs next.
    """
    ray_processes: list[psutil.Process] = []
    try:
        with local_ray(log_to_driver=ray_logs, worker_niceness=worker_niceness):
            try:
                with local_app(values, healthy_timeout_s=120) as url:
                    yield url
            finally:
                ray_processes = psutil.Process().children(recursive=True)  # GCS, raylet, agents, workers
    finally:
        wait_for_exit(ray_processes)


def wait_for_exit(processes: Sequence[psutil.Process], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until Ray's processes have ended, so they use no CPU during the next system."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    if alive:
        log.warning("%d Ray processes still running %g s after ray.shutdown(): %s",
                    len(alive), timeout_s, [p.pid for p in alive])


def _torch_threads(_actor: object) -> tuple[int, str | None, int]:
    """Runs inside a Ray actor (via __ray_call__): torch's intra-op threads, OMP_NUM_THREADS and
    the process's niceness there."""
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.nice(0)


def replica_threads() -> str:
    """torch threads inside the LLM replica (Ray sets OMP_NUM_THREADS from the actor's num_cpus)
    and the replica's niceness (Ray's default for workers is 15)."""
    import ray

    try:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "LLMServer" in a["name"]]
        actor = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
        threads, omp, niceness = ray.get(actor.__ray_call__.remote(_torch_threads), timeout=60)
    except Exception as err:  # a diagnostic only
        log.warning("could not ask the LLM replica for its torch threads: %s", err)
        return "unknown"
    return f"{threads} (OMP_NUM_THREADS={omp}), niceness {niceness}"


async def diagnostics(handle: Any, timeout_s: float = DIAGNOSTICS_TIMEOUT_S) -> dict[str, Any]:
    """The LLM replica's diagnostics() through its DeploymentHandle: stats, tasks, adapters, RSS."""
    return await asyncio.wait_for(_call_diagnostics(handle), timeout_s)


async def _call_diagnostics(handle: Any) -> dict[str, Any]:
    return await handle.diagnostics.remote()


# ----- transformers serve ---------------------------------------------------------------------


@dataclass(frozen=True)
class TransformersServe:
    """How `transformers serve --continuous-batching` is launched for the model our app serves."""

    model: str  # checkpoint folder (or hub id): FORCE_MODEL, and the `model` every request names
    dtype: str  # "bfloat16", "float32", ...
    device: str  # "cpu", "cuda"
    kv_blocks: int  # KV-cache blocks of TRANSFORMERS_PAGE_SIZE tokens (--cb-num-blocks)

    @classmethod
    def of(cls, values: dict[str, Any]) -> TransformersServe:
        """Our app's model as our loader resolves it (built-ins: the converted safetensors folder),
        with the dtype and device our engine would use and a KV cache of as many tokens as our
        engine's (`max_kv_tokens`); GGUF files are not supported.

        Without --cb-num-blocks it would size its cache on a CPU from 60% of the machine's RAM
        (about 14 GB here), and its first request would take 15-60 s longer to allocate it.
        """
        config = AppArgs.model_validate(values).engine_config()
        source, gguf_file = resolve_checkpoint(config.model, config.cache_dir)
        if gguf_file:
            raise ValueError(f"transformers-serve needs a checkpoint folder or hub id, not the GGUF file {gguf_file}")
        device = resolve_device(config.device)
        dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
        return cls(source, dtype, device.type, math.ceil(config.max_kv_tokens / TRANSFORMERS_PAGE_SIZE))

    def command(self, port: int | str) -> list[str]:
        """The command line (the venv's `transformers` script beside this Python)."""
        return [str(Path(sys.executable).with_name("transformers")), "serve", self.model, "--continuous-batching",
                "--dtype", self.dtype, "--device", self.device, "--cb-num-blocks", str(self.kv_blocks),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]

    def endpoint(self, url: str) -> Endpoint:
        """Requests name the forced model (any other name is a 400); no stream_options (always
        sends usage), EOS ignored through the generation config."""
        return Endpoint(url, self.model, extra_fields={}, ignore_eos_fields=TRANSFORMERS_IGNORE_EOS)


@contextmanager
def transformers_serve(spec: TransformersServe) -> Iterator[Endpoint]:
    """Start transformers serve on a free port, wait until /health answers, yield its Endpoint;
    on exit stop it and its children by PID. Its output goes to a log file (path logged)."""
    port = free_port()
    command = spec.command(port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.NamedTemporaryFile("wb", prefix="transformers-serve-", suffix=".log", delete=False) as output:
        log_path = Path(output.name)
        log.info("transformers-serve: %s (output: %s)", " ".join(command), log_path)
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process, log_path)
        yield spec.endpoint(url)
    finally:
        stop_process_tree(process)


def wait_until_up(url: str, process: subprocess.Popen[bytes], log_path: Path,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll {url}/health until it answers 200; raise with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with status {process.returncode}:\n{log_tail(log_path)}")
        try:
            wait_until_healthy(url, timeout_s=5)
            return
        except TimeoutError:
            pass
    raise TimeoutError(f"transformers serve did not answer {url}/health in {timeout_s:g} s:\n{log_tail(log_path)}")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process_tree(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a process we started and its children, SIGKILL whatever still runs after timeout_s."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for proc in alive:
        log.warning("transformers-serve: pid %d did not stop in %g s; killing it", proc.pid, timeout_s)
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    process.wait(timeout=timeout_s)


# ----- an ASGI app of the benchmark's own -------------------------------------------------------


@contextmanager
def uvicorn_thread(app: Any, name: str) -> Iterator[str]:
    """`app` on uvicorn in a background thread on a free port, until /health answers; yields its
    base URL. On exit the server stops; an error it raised is raised here, not lost with the thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    failure: list[BaseException] = []

    def serve_forever() -> None:
        try:
            server.run()
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=serve_forever, name=name, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout_s=120)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        if failure:
            raise RuntimeError(f"{name} failed") from failure[0]
