"""Application builder: `serve run serve_config.yaml` calls `build_app` with the config's args."""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.contract.settings import AppArgs, BatchSettings
from deployments.http.ingress import Ingress
from deployments.replica.llm import LLMServer
from deployments.routing.router import ConversationRouter


def build_app(args: AppArgs | dict) -> Application:
    """Ingress -> LLM deployment (Serve calls builders with exactly one argument).

    `args` is serve_config.yaml's `args` mapping (validated here) or an AppArgs.
    Serve options in serve_config.yaml's `deployments` section override the defaults.
    """
    return build_app_with(args)


def build_app_with(args: AppArgs | dict, llm_options: dict | None = None) -> Application:
    """`build_app`, with Serve option overrides for the LLM deployment (for programs and tests)."""
    args = AppArgs.model_validate(args)
    llm = serve.deployment(LLMServer).options(
        name="LLMServer",
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
        max_ongoing_requests=args.max_batch_size + args.batch.batch_size,
        max_queued_requests=args.max_queued_requests,
        user_config=args.batch.model_dump(),
        request_router_config=conversation_routing(args),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=30,
    ).options(**(llm_options or {}))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )
    # The LLM replicas get their batch settings only through user_config, so a change of
    # `batch` alone is a live `reconfigure`, not a restart with a model reload.
    replica_args = args.model_copy(update={"batch": BatchSettings()})
    return ingress.bind(llm.bind(replica_args), args)


def conversation_routing(args: AppArgs) -> RequestRouterConfig:
    """The LLM deployment's router (deployments/routing/router.py): a conversation's turns go to the
    replica holding its prefix unless it has half a batch more requests than the least loaded."""
    return RequestRouterConfig(
        request_router_class=ConversationRouter,
        request_router_kwargs={"max_imbalance": max(1, args.max_batch_size // 2)},
        request_routing_stats_period_s=2.0,  # adapter residency (record_routing_stats) ages at most this
    )
