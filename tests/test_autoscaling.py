"""Autoscaling on a simulated multi-node GPU cluster with the LLM autoscaling policy (the scenario
runs in its own process, in the test's fixture)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.autoscaling_scenario import MAX_TOKENS
from tests.serve_fixtures import ROOT

pytestmark = pytest.mark.timeout(600)  # one scenario of several minutes, in the first test's setup


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("autoscaling") / "report.json"
    subprocess.run(
        [sys.executable, "-m", "tests.autoscaling_scenario", str(tiny_model_dir), str(path)],
        cwd=ROOT, check=True, timeout=580,
    )
    return json.loads(path.read_text())


def test_llm_deployment_autoscales_across_gpu_nodes_and_back(report):
    counts = [count for _, count in report["timeline"]]
    assert report["scaled_up"] and max(counts) == 2, report["timeline"]
    assert report["scaled_down"] and counts[-1] == 1, report["timeline"]

    outcomes = report["outcomes"]
    assert len(outcomes) > report["requests_during_load"] > 0  # traffic before, during and after
    assert all(o["status"] == 200 and o["error"] is None and o["tokens"] == MAX_TOKENS for o in outcomes)
    texts = defaultdict(set)
    for o in outcomes:
        texts[o["prompt"]].add(o["text"])
    assert all(len(variants) == 1 for variants in texts.values())  # same answer on every replica

    served = [re.search(r"replica=(\S+)@(\S+)", line).groups() for line in report["request_log"] if "status=200" in line]
    per_replica = Counter(replica for replica, _ in served)
    nodes = {node for _, node in served}
    assert len(per_replica) >= 2 and min(per_replica.values()) >= 3, per_replica  # load was spread
    assert len(nodes) >= 2  # on different (fake GPU) nodes
