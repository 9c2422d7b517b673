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
    assert any(f"ray[default,tune]=={ray.__version__}" in cmd for cmd in config["setup_commands"])


def test_cluster_yaml_installs_advlab_itself_on_every_node() -> None:
    config = load()
    mounted = [dst for dst, src in config["file_mounts"].items() if src == "."]
    assert mounted, "the repository is not copied to the nodes"
    assert any(f"pip install -q -e {mounted[0]}" in cmd for cmd in config["setup_commands"])


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\[<>=;]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_kuberay_runtime_env_installs_every_dependency_of_advlab() -> None:
    import tomllib

    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    needed = _requirement_names(project["dependencies"]) - {"ray"}  # the image's Ray
    job = yaml.safe_load((CLUSTER.parent / "k8s" / "rayjob.yaml").read_text())
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert needed <= _requirement_names(runtime["pip"])
    assert "pip install -q --no-deps -e ." in job["spec"]["entrypoint"]


def test_kuberay_rayjob_runs_an_advlab_sweep_on_the_pinned_ray() -> None:
    job = yaml.safe_load((CLUSTER.parent / "k8s" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert "advlab sweep sweeps/" in job["spec"]["entrypoint"]
    assert "--address auto" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert all(image.startswith(f"rayproject/ray:{ray.__version__}-") for image in images)
    limits = [c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert any("nvidia.com/gpu" in limit for limit in limits)
    assert all(
        limit == c["resources"]["requests"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
        for limit in [c["resources"]["limits"]]
    )
