"""The shipped Serve configs validate against Ray's schema and our AppArgs, and agree with each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.contract.settings import AppArgs

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["serve_config.yaml", "serve_config.gpu.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates(name):
    config = load(name)
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        if app["import_path"] == "deployments.ui.page:build_ui_app":
            assert app["route_prefix"] == "/ui" and app["args"]["llm_app"] in {a["name"] for a in config["applications"]}
            continue
        assert app["import_path"] == "deployments.app:build_app"
        args = AppArgs.model_validate(app["args"])
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == {"LLMServer", "Ingress"}
        gpus = deployments["LLMServer"].get("ray_actor_options", {}).get("num_gpus", args.num_gpus)
        assert gpus == args.num_gpus


def test_default_config_is_cpu_and_gpu_config_is_gpu():
    cpu = AppArgs.model_validate(load("serve_config.yaml")["applications"][0]["args"])
    gpu_app = load("serve_config.gpu.yaml")["applications"][0]
    gpu = AppArgs.model_validate(gpu_app["args"])
    assert cpu.num_gpus == 0 and cpu.model == "smollm2-135m-instruct"
    assert gpu.num_gpus == 1 and gpu.device == "cuda" and "alpaca-lora-7b" in gpu.adapters
    scaling = gpu_app["deployments"][0]["autoscaling_config"]
    assert scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]


def test_unknown_args_are_rejected():
    with pytest.raises(ValidationError, match="batchsize"):
        AppArgs.model_validate({"batchsize": 4})
    with pytest.raises(ValidationError, match="unknown adapters"):
        AppArgs.model_validate({"adapters": {"a": "/x"}, "preload_adapters": ["b"]})


def test_cluster_yaml_follows_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = load("cluster.yaml")
    validate_config(prepare_config(cluster))  # what `ray up` does before it starts anything
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no replica on the head node
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert all(t["max_workers"] >= t["min_workers"] for t in workers)
    assert any("requirements.txt" in command for command in cluster["setup_commands"])


def test_kuberay_service_carries_the_gpu_serve_config():
    service = load("deploy/kuberay/rayservice.yaml")
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    gpu_apps = load("serve_config.gpu.yaml")["applications"]
    assert embedded["applications"] == gpu_apps
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"])


def test_project_relative_adapters_resolve_and_the_demo_adapter_ships():
    args = AppArgs.model_validate(load("serve_config.yaml")["applications"][0]["args"])
    source = Path(args.adapter_source("pirate"))
    assert source.is_absolute() and (source / "adapter_config.json").is_file()
    assert AppArgs(adapters={"hub": "tloen/alpaca-lora-7b"}).adapter_source("hub") == "tloen/alpaca-lora-7b"


def test_message_pause_grows_with_load():
    from deployments.replica.llm import message_pause

    assert message_pause(0.25, running=1) == 0.0
    assert 0 < message_pause(0.25, running=3) < message_pause(0.25, running=6) < 0.25
    assert message_pause(0.25, running=40) == 0.25
