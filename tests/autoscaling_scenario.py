"""A load scenario on a simulated multi-node GPU cluster; test_autoscaling.py runs it.

It runs in its own process because a process can join only one Ray cluster, and the other
tests share a local one. The cluster has a CPU head node and two fake GPU nodes; the app is
deployed from a Serve config (the path `serve deploy` takes) whose LLMServer section is the
one in serve_config.yaml with the tiny model and short autoscaling delays. Two phases on the
same cluster (a cluster with its first replicas takes about half a minute to start here):

1. Autoscaling: heavy load until the policy runs 2 replicas, then one client while it goes
   back to 1.
2. Conversations: the config again with the LLM deployment held at 2 replicas (a lightweight
   update, fixed_replicas_config: one replica starts); several multi-turn chats (each
   turn re-sends the whole history and a new message), the prefix-cache counters of both
   replicas read before and after the later turns; then the replica that served the first
   conversation is killed and every conversation takes one more turn.

It writes a JSON report: the replica count over time, every request's outcome, every
conversation turn's response id (the request log names the replica that served it), the
counters, and the killed replica.

    python -m tests.autoscaling_scenario MODEL_DIR REPORT_JSON
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

from client.bodies import chat_body, user_message
from client.servers import free_port, wait_until_healthy
from client.stream import StreamError, achunks, aevent_data, completion_tokens, delta_text, error_text
from deployments.local import WORKER_NICENESS, every_replica_diagnostics
from tests.serve_fixtures import ROOT

log = logging.getLogger("autoscaling_scenario")
PROMPTS = ["Tell me about rivers.", "Count to ten.", "Describe a cat.", "What is rain?"]
MAX_TOKENS = 200
LOAD_CLIENTS = 6
TIME_LIMIT_S = 150
CONVERSATIONS = 6
TURNS = 5  # then one more after a replica is killed
REPLY_TOKENS = 24
PROXY_READY_TIMEOUT_S = 60  # Serve's default is 5 s; see main()


def scenario_config(model_dir: str, port: int, request_log: str) -> dict:
    """serve_config.yaml's LLM application on the tiny model, with test-speed autoscaling."""
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    app["args"].update(
        model=model_dir, served_model_name="tiny", dtype="float32", num_gpus=1, num_cpus=0,
        max_batch_size=4, request_log_file=request_log, adapters={},  # the config's adapters fit SmolLM2 only
    )  # max_batch_size 4 < LOAD_CLIENTS: requests wait for rows, which the LLM policy scales on
    app["args"]["batch"].update(batch_size=2, stream_interval_s=0.0)
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    llm["ray_actor_options"] = {"num_gpus": 1, "num_cpus": 0}
    llm["max_ongoing_requests"] = 8
    llm["autoscaling_config"].update(
        min_replicas=1, initial_replicas=1, max_replicas=2, target_ongoing_requests=2,
        upscale_delay_s=1, downscale_delay_s=3, metrics_interval_s=0.5, look_back_period_s=2,
    )
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}


def fixed_replicas_config(config: dict, replicas: int) -> dict:
    """`config` with the LLM deployment held at `replicas` replicas by its autoscaling bounds.
    A lightweight update: the running replica stays, with its prefix cache, and only the
    missing ones start. (Dropping `autoscaling_config` for `num_replicas` would not be one:
    Serve's code version of an app includes its autoscaling policies, so every replica of both
    deployments would restart.)"""
    config = json.loads(json.dumps(config))
    llm = next(d for d in config["applications"][0]["deployments"] if d["name"] == "LLMServer")
    llm["autoscaling_config"].update(min_replicas=replicas, initial_replicas=replicas, max_replicas=replicas)
    return config


def running_replicas() -> int:
    app = serve.status().applications.get("llm")
    status = app and app.deployments.get("LLMServer")  # absent while a new config is applied
    return status.replica_states.get("RUNNING", 0) if status else 0


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat request: status (0 when the connection failed), the response id (the
    request log's `id=`), reply text, completion tokens (from a usage chunk) and error."""
    status, response_id, text, tokens, error = 0, None, "", 0, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            status = response.status_code
            if status != 200:
                error = error_text(json.loads(await response.aread()))
            else:
                async for chunk in achunks(aevent_data(response)):
                    response_id = response_id or chunk.get("id")
                    text += delta_text(chunk)
                    tokens = completion_tokens(chunk) or tokens
    except StreamError as err:
        error = str(err)
    except httpx.HTTPError as err:
        status, error = 0, repr(err)
    return {"status": status, "id": response_id, "text": text, "tokens": tokens, "error": error}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, outcomes: list) -> None:
    body = chat_body("tiny", user_message(prompt), max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0,
                     stream_options={"include_usage": True})
    outcomes.append({"prompt": prompt, **await stream_chat(client, url, body), "finished_at": time.monotonic()})


async def chat_turn(client: httpx.AsyncClient, url: str, messages: list[dict]) -> dict:
    """One streamed chat turn (see stream_chat)."""
    body = chat_body("tiny", messages, max_tokens=REPLY_TOKENS, ignore_eos=True, temperature=0)
    return await stream_chat(client, url, body)


async def prefix_counters() -> dict[str, list[int]]:
    """[prefix_cache_queries, prefix_cache_hits] of each LLM replica, by replica name (the
    request log's `replica=`), from the replicas' diagnostics()."""
    answers = await every_replica_diagnostics(2, app_name="llm")
    return {name: [a["stats"].prefix_cache_queries, a["stats"].prefix_cache_hits] for name, a in answers.items()}


def served_by(request_log: Path, response_id: str, timeout_s: float = 10) -> str | None:
    """The `replica=` of the request log line of `response_id` (the ingress writes it as the
    stream ends), waiting up to `timeout_s` for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in request_log.read_text().splitlines():
            if f"id={response_id} " in line and (found := re.search(r"replica=(\S+)", line)):
                return found.group(1)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def kill_replica(name: str, timeout_s: float = 30) -> None:
    """Kill the LLM replica `name` (`<id>@<node>`) the way a crash would, and wait until Ray
    reports its actor dead."""
    actor = ray.get_actor(f"SERVE_REPLICA::llm#LLMServer#{name.split('@')[0]}", namespace="serve")
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"replica {name} still answers {timeout_s} s after ray.kill")


def question(conversation: int, turn: int) -> str:
    return f"Conversation {conversation}, question {turn}: what do you know about topic {conversation * 7 + turn}?"


async def converse(url: str, request_log: Path) -> dict:
    """Phase 2 (module docstring). Turns are sent one at a time, round-robin over the
    conversations: at max_batch_size 4 the router's busier rule (more than 2 requests beyond
    the least loaded replica) would otherwise rightly move a turn when 4 chats hit one replica
    at once, and this phase tests the affinity, not that rule (tests/test_routing.py does)."""
    histories: list[list[dict]] = [[] for _ in range(CONVERSATIONS)]
    turns: list[dict] = []

    async def turn(client: httpx.AsyncClient, conversation: int, number: int) -> None:
        history = histories[conversation]
        history.append({"role": "user", "content": question(conversation, number)})
        outcome = await chat_turn(client, url, history)
        history.append({"role": "assistant", "content": outcome["text"]})
        replica = outcome["id"] and await asyncio.to_thread(served_by, request_log, outcome["id"])
        turns.append({"conversation": conversation, "turn": number, "replica": replica, **outcome})

    deadline = time.monotonic() + 60
    while len(await prefix_counters()) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the second replica is running; wait until routers know it
    async with httpx.AsyncClient(timeout=60) as client:
        for c in range(CONVERSATIONS):
            await turn(client, c, 1)
        before = await prefix_counters()  # the later turns' lookups and hits are after - before
        for number in range(2, TURNS + 1):
            for c in range(CONVERSATIONS):
                await turn(client, c, number)
        after = await prefix_counters()
        killed = next(t["replica"] for t in turns if t["conversation"] == 0)
        await asyncio.to_thread(kill_replica, killed)
        for c in range(CONVERSATIONS):
            await turn(client, c, TURNS + 1)
    return {"turns": turns, "counters_before": before, "counters_after": after, "killed": killed}


async def client_loop(url: str, index: int, stop: asyncio.Event, outcomes: list) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        n = index
        while not stop.is_set():
            await one_request(client, url, PROMPTS[n % len(PROMPTS)], outcomes)
            n += 1


async def watch(until, timeline: list, start: float, limit_s: float) -> bool:
    """Record the replica count every 0.5 s until `until(count)` holds or time runs out."""
    while time.monotonic() - start < limit_s:
        count = await asyncio.to_thread(running_replicas)
        timeline.append([round(time.monotonic() - start, 1), count])
        if until(count):
            return True
        await asyncio.sleep(0.5)
    return False


async def drive(url: str) -> dict:
    """Heavy load until two replicas serve; then one light client while it scales back down."""
    start, timeline, outcomes = time.monotonic(), [], []
    heavy_stop, light_stop = asyncio.Event(), asyncio.Event()
    heavy = [asyncio.create_task(client_loop(url, i, heavy_stop, outcomes)) for i in range(LOAD_CLIENTS)]
    light = asyncio.create_task(client_loop(url, 0, light_stop, outcomes))
    scaled_up = await watch(lambda n: n >= 2, timeline, start, TIME_LIMIT_S / 2)
    await asyncio.sleep(8)  # let both replicas serve a while under load
    heavy_stop.set()
    await asyncio.gather(*heavy)
    load_ended = len(outcomes)
    scaled_down = await watch(lambda n: n <= 1, timeline, start, TIME_LIMIT_S)
    await asyncio.sleep(2)  # requests keep completing after the scale-down too
    light_stop.set()
    await light
    return {"scaled_up": scaled_up, "scaled_down": scaled_down, "timeline": timeline,
            "outcomes": outcomes, "requests_during_load": load_ended}


def main(model_dir: str, report: str) -> None:
    logging.basicConfig(level=logging.INFO)
    request_log = str(Path(report).with_suffix(".requests.log"))
    # Serve's controller kills a proxy not ready within 5 s (then serve_start fails with
    # ActorDiedError): three Ray nodes starting on two busy cores can take longer. The nodes
    # inherit this process's environment.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_TIMEOUT_S))
    # Workers at niceness 0, as `make serve` runs them (deployments/local.py): at Ray's default
    # 15 the replicas starve beside busy processes and the app never becomes healthy.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": {"worker_niceness": WORKER_NICENESS}})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        port = free_port()
        client = serve_start(http_options={"host": "127.0.0.1", "port": port})
        config = scenario_config(model_dir, port, request_log)
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout_s=180)  # Serve's own blocking deploy gives up after 60 s
        result = asyncio.run(drive(url))
        client.deploy_apps(ServeDeploySchema.model_validate(fixed_replicas_config(config, 2)), _blocking=False)
        deadline = time.monotonic() + 120
        while running_replicas() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        result["conversations"] = asyncio.run(converse(url, Path(request_log)))
        result["conversations"]["kv_block_size"] = config["applications"][0]["args"]["kv_block_size"]
        result["request_log"] = Path(request_log).read_text().splitlines()
        Path(report).write_text(json.dumps(result))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
