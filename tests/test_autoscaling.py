"""Autoscaling on a simulated multi-node GPU cluster (the scenario runs in its own process)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict

from tests.autoscaling_scenario import MAX_TOKENS
from tests.serve_fixtures import ROOT


def test_llm_deployment_autoscales_across_gpu_nodes_and_back(tiny_model_dir, tmp_path):
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "tests.autoscaling_scenario", str(tiny_model_dir), str(report)],
        cwd=ROOT, check=True, timeout=400,
    )
    result = json.loads(report.read_text())
    counts = [count for _, count in result["timeline"]]
    assert result["scaled_up"] and max(counts) == 2, result["timeline"]
    assert result["scaled_down"] and counts[-1] == 1, result["timeline"]

    outcomes = result["outcomes"]
    assert len(outcomes) > result["requests_during_load"] > 0  # traffic before, during and after
    assert all(o["status"] == 200 and o["error"] is None and o["tokens"] == MAX_TOKENS for o in outcomes)
    texts = defaultdict(set)
    for o in outcomes:
        texts[o["prompt"]].add(o["text"])
    assert all(len(variants) == 1 for variants in texts.values())  # same answer on every replica

    served = [re.search(r"replica=(\S+)@(\S+)", line).groups() for line in result["request_log"] if "status=200" in line]
    per_replica = Counter(replica for replica, _ in served)
    nodes = {node for _, node in served}
    assert len(per_replica) >= 2 and min(per_replica.values()) >= 3, per_replica  # load was spread
    assert len(nodes) >= 2  # on different (fake GPU) nodes
