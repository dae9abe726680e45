"""infra/: every file parses, and the cross-references hold: one image whose Ray is this repository's,
entrypoints that name existing files with valid config overrides, dashboard queries over metric names
that exist (step_ray's in step_ray/prometheus.py, Ray's in Ray's source), one bucket prefix everywhere."""
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE_IN_POD = "/home/ray/step_ray"  # infra/Dockerfile's WORKDIR


def _docs(name):
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _containers(obj):
    if isinstance(obj, dict):
        if "containers" in obj:
            yield from obj["containers"]
        for v in obj.values():
            yield from _containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _containers(v)


@pytest.fixture(scope="module")
def raycluster():
    return next(d for d in _docs("raycluster.yaml") if d["kind"] == "RayCluster")


@pytest.fixture(scope="module")
def rayjob():
    (job,) = _docs("rayjob.yaml")
    return job


def test_every_file_parses():
    names = {p.name for p in INFRA.iterdir()}
    assert {"raycluster.yaml", "rayjob.yaml", "prometheus.yml", "grafana-dashboard.json", "iam-policy.json",
            "README.md", "Dockerfile"} <= names
    for p in INFRA.iterdir():
        if p.suffix in (".yaml", ".yml"):
            assert _docs(p.name), p
        elif p.suffix == ".json":
            json.loads(p.read_text())


def test_kuberay_manifests(raycluster, rayjob):
    import ray

    assert raycluster["apiVersion"] == rayjob["apiVersion"] == "ray.io/v1"
    assert raycluster["spec"]["rayVersion"] == ray.__version__
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    head = raycluster["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in json.dumps(head)  # a CPU head, as in cluster.yaml
    groups = raycluster["spec"]["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
        (c,) = g["template"]["spec"]["containers"]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and g["rayStartParams"]["num-gpus"] == str(gpus)
        assert g["template"]["spec"]["serviceAccountName"] == head["template"]["spec"]["serviceAccountName"]
    for spec in [head, *groups]:
        assert spec["rayStartParams"]["metrics-export-port"] == "8080"
        assert any(p.get("name") == "metrics" and p["containerPort"] == 8080
                   for c in spec["template"]["spec"]["containers"] for p in c.get("ports", []))
    assert head["serviceType"] == "ClusterIP"
    # the job runs on this cluster
    assert rayjob["spec"]["clusterSelector"]["ray.io/cluster"] == raycluster["metadata"]["name"]
    sa = next(d for d in _docs("raycluster.yaml") if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["name"] == head["template"]["spec"]["serviceAccountName"]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    # same GPU groups as cluster.yaml
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpu_types = sorted(t["resources"]["GPU"] for t in cluster["available_node_types"].values()
                       if t["resources"].get("GPU"))
    assert sorted(int(g["rayStartParams"]["num-gpus"]) for g in groups) == gpu_types


def test_one_image_built_on_this_ray(raycluster, rayjob):
    import ray

    images = {c["image"] for c in _containers(raycluster)} | {c["image"] for c in _containers(rayjob)}
    assert len(images) == 1, images
    (image,) = images
    tag = image.rsplit(":", 1)[1]
    assert tag.split("-")[0] == ray.__version__, f"{image}: tag is not Ray {ray.__version__}"
    base = re.search(r"^FROM\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{tag}"  # the project image is named after the Ray image it extends
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == base  # and cluster.yaml runs the same Ray image
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_IN_POD}" in dockerfile and '".[gpu]"' in dockerfile
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies missing {path}"


def test_rayjob_entrypoint_is_a_valid_pretrain_command(rayjob):
    from step_ray.config import load_config
    from step_ray.pipelines.pretrain import PretrainJobConfig

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    assert script.startswith(IMAGE_IN_POD + "/")
    assert (REPO / script[len(IMAGE_IN_POD) + 1:]).is_file(), script
    cfg = load_config(PretrainJobConfig, None, argv[2:])  # unknown keys / wrong types would raise
    assert cfg.run.storage_path.startswith("s3://YOUR_BUCKET/step_ray/")
    assert cfg.data.root.startswith("s3://YOUR_BUCKET/step_ray/")
    yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])


def _exprs():
    dash = json.loads((INFRA / "grafana-dashboard.json").read_text())
    assert dash["panels"]
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_queries_metrics_that_exist():
    import ray

    from step_ray.prometheus import METRICS, exported_name

    ours = {exported_name(n) + ("_total" if kind == "counter" else ""): n for n, (kind, _, _) in METRICS.items()}
    names = {n for e in _exprs() for n in re.findall(r"\b(ray_[a-z0-9_]+)\b", e)}
    step_ray = {n for n in names if n.startswith("ray_step_ray_")}
    assert step_ray == set(ours), f"dashboard vs step_ray/prometheus.py: {sorted(step_ray ^ set(ours))}"
    reporter = (Path(ray.__file__).parent / "dashboard/modules/reporter/reporter_agent.py").read_text()
    for n in names - step_ray:  # Ray's node metrics, defined in its reporter agent
        assert f'"{n[len("ray_"):]}"' in reporter, n
    # labels used in legends are tag keys of the metrics
    dash = json.loads((INFRA / "grafana-dashboard.json").read_text())
    for p in dash["panels"]:
        for t in p["targets"]:
            for n in re.findall(r"\b(ray_step_ray_[a-z0-9_]+)\b", t["expr"]):
                tags = set(METRICS[ours[n]][2])
                for label in re.findall(r"by \(([^)]*)\)", t["expr"]):
                    assert {x.strip() for x in label.split(",")} <= tags, (n, label)


def test_prometheus_scrapes_ray_service_discovery_and_kuberay_pods(raycluster):
    prom = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    keep = [r["regex"] for r in jobs["ray-kuberay"]["relabel_configs"] if r.get("action") == "keep"]
    assert raycluster["metadata"]["name"] in keep and "metrics" in keep


def test_iam_policy_is_one_bucket_prefix():
    policy = json.loads((INFRA / "iam-policy.json").read_text())
    actions, resources = set(), set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all(a.startswith("s3:") and "*" not in a for a in acts), acts
        actions |= set(acts)
        resources |= set(st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    assert resources == {"arn:aws:s3:::YOUR_BUCKET", "arn:aws:s3:::YOUR_BUCKET/step_ray/*"}
    listing = next(st for st in policy["Statement"] if "s3:ListBucket" in st["Action"])
    prefixes = next(iter(listing["Condition"].values()))["s3:prefix"]
    assert all(p.startswith("step_ray") for p in prefixes)
