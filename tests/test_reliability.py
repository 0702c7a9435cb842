"""Load shedding, a killed replica, a soak with disconnects, API keys on the page, fuzzing."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from ray import serve

from client import bodies
from client.stream import DONE, ErrorEvent, aevent_data, decode_chunk, event_data
from deployments.app import build_app
from tests.serve_fixtures import SERVED_MODEL, llm_handle


def app_args(tiny_model_dir, **extra) -> dict:
    return {"model": str(tiny_model_dir), "served_model_name": SERVED_MODEL, "dtype": "float32", "num_cpus": 0,
            **extra}


def chat_body(content: str, max_tokens: int, stream: bool = True) -> dict:
    return bodies.chat_body(SERVED_MODEL, bodies.user_message(content), stream=stream, max_tokens=max_tokens,
                            ignore_eos=True, temperature=0)


async def test_full_replica_queues_answer_503_at_once(served, tiny_model_dir):
    args = app_args(tiny_model_dir, max_batch_size=1, max_queued_requests=1, batch={"batch_size": 1})
    serve.run(build_app(args), name="shed", route_prefix="/shed")
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            async def call(i: int) -> tuple[int, float, httpx.Response]:
                started = time.monotonic()
                response = await client.post(f"{served}/shed/v1/chat/completions", json=chat_body(f"q{i}", 300))
                return response.status_code, time.monotonic() - started, response

            results = await asyncio.gather(*(call(i) for i in range(8)))
        shed = [r for r in results if r[0] == 503]
        served_ok = [r for r in results if r[0] == 200]
        assert shed and served_ok and len(shed) + len(served_ok) == 8
        assert all(r[2].headers["retry-after"] == "1" for r in shed)
        assert max(r[1] for r in shed) < min(r[1] for r in served_ok)  # refused at once, not after waiting
        assert all(list(event_data(r[2]))[-1] == DONE for r in served_ok)
    finally:
        serve.delete("shed")


def find_replica_actor(app: str, deployment: str):
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no replica of {app}/{deployment}")


def test_killed_replica_ends_its_streams_with_an_error_and_is_replaced(served, tiny_model_dir):
    import ray

    serve.run(build_app(app_args(tiny_model_dir)), name="fault", route_prefix="/fault")
    try:
        with httpx.stream("POST", f"{served}/fault/v1/chat/completions", json=chat_body("go", 1900), timeout=60) as r:
            events = event_data(r)
            assert decode_chunk(next(events))["choices"]
            ray.kill(find_replica_actor("fault", "LLMServer"), no_restart=True)
            rest = list(events)
        assert rest[-1] == DONE
        with pytest.raises(ErrorEvent, match="The server had an error while processing request"):
            decode_chunk(rest[-2])
        deadline = time.monotonic() + 90
        while True:  # Serve notices the dead replica and starts another
            response = httpx.post(f"{served}/fault/v1/chat/completions", json=chat_body("again", 5, False), timeout=30)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
    finally:
        serve.delete("fault")


async def diagnostics() -> dict:
    return await llm_handle().diagnostics.remote()


async def test_soak_with_random_disconnects_leaks_nothing(served):
    """300 requests, a third of them dropped mid-stream. Bound: RSS grows < 200 MB, nothing left
    behind. The baseline is read after a few requests: the replica starts some tasks on its
    first requests (@serve.batch's queue), which a fresh replica (this file run alone) would
    otherwise count as left behind."""
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(client.post(f"{served}/v1/chat/completions", json=chat_body(f"warm {i}", 4))
                               for i in range(4)))
        before = await diagnostics()
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with semaphore:
                drop_after = rng.randint(1, 5) if rng.random() < 1 / 3 else None
                body = chat_body(f"soak {i}", rng.randint(5, 60))
                async with client.stream("POST", f"{served}/v1/chat/completions", json=body) as response:
                    seen = 0
                    async for data in aevent_data(response):
                        seen += 1
                        if drop_after and seen >= drop_after:
                            return "dropped"
                        if data == DONE:
                            return "done"
                return "incomplete"

        outcomes = await asyncio.gather(*(one(i) for i in range(300)))
    assert outcomes.count("incomplete") == 0 and outcomes.count("dropped") > 50
    deadline = time.monotonic() + 20
    after = await diagnostics()
    while (after["stats"].tracked_requests or after["tasks"] > before["tasks"] + 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        after = await diagnostics()
    stats = after["stats"]
    assert stats.running == 0 and stats.waiting == 0 and stats.tracked_requests == 0
    assert stats.kv_blocks_used == 0  # every KV block of finished and dropped requests was given back
    assert after["tasks"] <= before["tasks"] + 2  # the gauge task may start; request tasks must not stay
    assert after["adapters"] == before["adapters"]
    assert after["rss_bytes"] - before["rss_bytes"] < 200 * 2**20


def test_chat_page_asks_for_a_key_when_keys_are_set(served):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    from deployments.ui.page import build_ui_app

    serve.run(build_ui_app({"llm_app": "llm", "api_keys": ["sk-page"]}), name="ui-keys", route_prefix="/ui-keys")
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(f"{served}/ui-keys/", verbose=False)
        with pytest.raises(ValueError, match="Could not login to"):  # Gradio answers a wrong key with 400
            Client(f"{served}/ui-keys/", auth=("anyone", "sk-wrong"), verbose=False)
        client = Client(f"{served}/ui-keys/", auth=("anyone", "sk-page"), verbose=False)
        bubbles, _, _ = client.predict("Hello", "", SERVED_MODEL, 0.0, 0.95, 0, 16, 1.0, api_name="/chat")
        assert bubbles[-1]["role"] == "assistant"
        client.close()
    finally:
        # Not waiting for the page's replica to stop: the client's heartbeat stream stays open
        # until its next beat, and Serve lets an open request run out the replica's graceful
        # shutdown timeout (20 s); the replica is idle meanwhile, and Serve still stops it.
        serve.delete("ui-keys", _blocking=False)


def test_fuzzing_the_openapi_schema_finds_no_server_error(served):
    """Every check but positive_data_acceptance: limits such as the context window or the
    max_tokens cap reject some schema-valid bodies (413/400) by design."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=12, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case):
            for field in ("max_tokens", "max_output_tokens"):  # short replies: the fuzzing is about the HTTP layer
                if isinstance(case.body, dict) and field in case.body:
                    case.body[field] = min(case.body[field] or 8, 8)
            case.call_and_validate(base_url=served, timeout=60, excluded_checks=[positive_data_acceptance])

        try:
            fuzz()
        except Exception as err:  # collect every operation's failure before asserting
            failures.append(f"{operation.label}: {err}")
    assert not failures, "\n".join(failures)
