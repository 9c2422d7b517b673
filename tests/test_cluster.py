"""cluster.yaml checked offline: Ray's own schema and config validation, no cloud credentials."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_schema_and_validation() -> None:
    config = load()
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))


def test_node_types_declare_real_ray_resources() -> None:
    nodes = load()["available_node_types"]
    for name, node in nodes.items():
        # Ray's resource names are upper case; a lower-case "gpu" would be a custom resource.
        assert set(node["resources"]) <= {"CPU", "GPU", "memory"}, name
        assert all(isinstance(v, int) for v in node["resources"].values()), name
    assert any(node["resources"].get("GPU", 0) >= 1 for node in nodes.values())
    assert any("GPU" not in node["resources"] for node in nodes.values())


def test_docker_images_and_setup_pin_the_installed_ray_version() -> None:
    config = load()
    docker = config["docker"]
    for key in ("image", "head_image", "worker_image"):
        assert docker[key].startswith(f"rayproject/ray:{ray.__version__}-"), key
    assert any("--shm-size" in option for option in docker["run_options"])
    assert any(f"ray[tune]=={ray.__version__}" in cmd for cmd in config["setup_commands"])
