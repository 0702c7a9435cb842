"""The HTTP ingress deployment: the FastAPI app of api.py over a handle to the LLM.

Ray glue only. Each request streams from the LLM deployment through a streaming
DeploymentHandle (deployments/frontend/handle.py); the LLM deployment's router
(deployments/routing/router.py) reads the call's adapter and conversation from the call itself.
One log line and metrics per finished request (deployments/frontend/request_log.py).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle

from deployments.contract.runtime_adapters import ActorAdapters, RegistryActor
from deployments.contract.settings import AppArgs
from deployments.frontend.guard import KEYS_ENV, resolve_keys
from deployments.frontend.handle import HandleBackend
from deployments.frontend.request_log import RequestRecorder
from deployments.frontend.served_models import CachedNames
from deployments.http.api import ApiSettings, build_api
from deployments.telemetry.adapter_metrics import app_labels

log = logging.getLogger("ray.serve")


class Ingress:
    """Serves the OpenAI-compatible API, /generate and /health."""

    def __init__(self, llm: DeploymentHandle, args: AppArgs):
        self.llm, self.args = llm, args
        self.recorder = RequestRecorder(args.request_log_file, app_labels(args))
        self.api_keys = resolve_keys(args.api_keys)
        self.runtime_adapters = ActorAdapters(registry_actor()) if args.allow_runtime_adapters else None
        if not self.api_keys:
            log.warning("no API keys set (api_keys or %s): the API is open to anyone who can reach it", KEYS_ENV)

    def __serve_build_asgi_app__(self) -> FastAPI:
        args = self.args
        settings = ApiSettings(
            model_name=args.model_name,
            model_aliases=(args.model,),
            adapters=tuple(args.adapters),
            on_finish=self.recorder.record,
            api_keys=self.api_keys,
            rate_limit_per_minute=args.rate_limit_per_minute,
            max_body_bytes=args.max_body_bytes,
            max_messages=args.max_messages,
            runtime_adapters=self.runtime_adapters,
            stored_adapters=CachedNames(self.llm.adapter_names.remote) if args.adapter_stores else None,
        )
        return build_api(HandleBackend(self.llm), settings)


def registry_actor():
    """The application's runtime adapter table (deployments/contract/runtime_adapters.py): created by
    the first ingress replica that asks, found by name by every other one. Detached, so it
    outlives the replica that created it."""
    import ray
    from ray import serve

    app = serve.get_replica_context().app_name
    return ray.remote(num_cpus=0)(RegistryActor).options(
        name=f"runtime-adapters-{app}", namespace="lora-serve", get_if_exists=True, lifetime="detached",
    ).remote()
