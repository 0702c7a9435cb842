"""The application in a private local Ray instance on this machine, for tests and benchmarks
(`serve run serve_config.yaml` is the way to serve it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client.servers import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "llm"
# Ray starts every worker process (Serve's controller, proxy and replicas, so also the model's
# threads) at niceness 15, below its own daemons (GCS, raylet, agents) and below any client on
# the machine at 0. Where the model computes on the CPU, every wake-up of those then preempts a
# model thread, and its partner waits at the next OpenMP barrier. 0 runs workers like
# everything else (see README, "Scaling", the worker-priority item).
WORKER_NICENESS = 0


@contextmanager
def local_ray(num_cpus: int = 2, log_to_driver: bool = False,
              worker_niceness: int = WORKER_NICENESS) -> Iterator[None]:
    """A private local Ray instance whose workers can import this repository and run at
    `worker_niceness` (Ray's own default is 15); shut down on exit."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}},
        log_to_driver=log_to_driver,
        _system_config={"worker_niceness": worker_niceness},
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def local_app(args: dict[str, Any], port: int | None = None, healthy_timeout_s: float = 60,
              llm_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Serve on 127.0.0.1 running the application built from `args` (inside `local_ray`) as
    APP_NAME at /, with Serve option overrides for the LLM deployment; yields its base URL once
    /health answers. Serve is shut down on exit."""
    from ray import serve

    from deployments.app import build_app_with

    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app_with(args, llm_options), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout_s=healthy_timeout_s)
        yield url
    finally:
        serve.shutdown()


def llm_handle(app_name: str = APP_NAME) -> Any:
    """A DeploymentHandle to the application's LLM deployment (inside `local_app`)."""
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=app_name)


async def every_replica_diagnostics(replicas: int, attempts: int = 60, app_name: str = APP_NAME) -> dict[str, dict]:
    """diagnostics() of each LLM replica, by replica name, asking through a handle until
    `replicas` different replicas have answered (calls without a prompt go to a random least
    loaded replica); fewer if `attempts` run out first."""
    handle = llm_handle(app_name)
    seen: dict[str, dict] = {}
    for _ in range(attempts):
        answer = await handle.diagnostics.remote()
        seen[answer["replica"]] = answer
        if len(seen) >= replicas:
            break
        await asyncio.sleep(0.01)
    return seen
