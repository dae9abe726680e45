"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and defaults), and says what
the issue asks: CPU head, autoscaling GPU workers, the package with its gpu extra, an instance profile,
the dashboard on the head's localhost."""
import copy
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_valid_against_rays_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # what `ray up` does before launching anything: merge the AWS defaults, then validate the result
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cluster))
    validate_config(full)
    assert full["provider"]["type"] == "aws"


def test_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker group"
    for name, t in gpu.items():
        assert 0 <= t["min_workers"] < t["max_workers"] <= cluster["max_workers"], name
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), name
    for name, t in types.items():  # S3 through an instance profile on every node, never keys
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+",
                            t["node_config"]["IamInstanceProfile"]["Arn"]), name
    text = (REPO / "cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


def test_package_gpu_extra_and_docker_image(cluster):
    import ray
    import tomllib

    setup = " ".join(cluster["setup_commands"])
    assert re.search(r"pip install .*step_ray\[gpu\]", setup)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras
    assert cluster["file_mounts"]["~/step_ray"] == "."
    image = cluster["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.split(":")[1].startswith(ray.__version__ + "-")


def test_dashboard_on_head_localhost_and_metrics_exported(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--metrics-export-port=8080" in head
    assert "--metrics-export-port=8080" in " ".join(cluster["worker_start_ray_commands"])
