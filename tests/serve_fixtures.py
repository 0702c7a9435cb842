"""Start a local Ray cluster and a Serve app on a tiny model, for tests that talk HTTP."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from client.servers import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "llm"
SERVED_MODEL = "tiny"


@contextmanager
def local_ray(num_cpus: int = 2):
    """A private local Ray instance whose workers can import this repository."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}},
        log_to_driver=os.environ.get("TEST_RAY_LOGS") == "1",
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def serve_app(args: dict, port: int | None = None):
    """Run the application built from `args` on 127.0.0.1; yield its base URL."""
    from ray import serve

    from deployments.app import build_app

    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url)
    try:
        yield url
    finally:
        serve.shutdown()


def llm_handle():
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
