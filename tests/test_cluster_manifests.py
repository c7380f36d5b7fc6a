"""The KubeRay manifests parse, carry the fields KubeRay requires, keep the dashboard inside
the cluster, mount the shared run storage, and their entrypoint names a job and a config
that exist."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cbd_ray.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "cluster" / "kuberay"


def docs() -> dict[str, dict]:
    out = {}
    for f in sorted(KUBE.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                out[f"{d['kind']}/{d['metadata']['name']}"] = d
    return out


def clusters() -> list[dict]:
    return [d for d in docs().values() if d["kind"] == "RayCluster"]


def test_every_manifest_has_kind_version_and_name():
    ds = docs()
    assert {k.split("/")[0] for k in ds} == {"RayCluster", "RayJob", "PersistentVolumeClaim"}
    for d in ds.values():
        assert d["apiVersion"] in ("ray.io/v1", "v1") and d["metadata"]["name"]


def _containers(template: dict) -> list[dict]:
    cs = template["spec"]["containers"]
    assert cs and all(c.get("image") and c.get("name") for c in cs)
    return cs


@pytest.mark.parametrize("name", ["cbd-ray-gpu", "cbd-ray-npu"])
def test_raycluster_required_fields(name):
    c = docs()[f"RayCluster/{name}"]["spec"]
    head = c["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    _containers(head["template"])
    # the dashboard stays inside the cluster
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False
    assert c["workerGroupSpecs"]
    for g in c["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _containers(g["template"])


def _worker_resources(name: str) -> dict:
    g = docs()[f"RayCluster/{name}"]["spec"]["workerGroupSpecs"][0]
    return g, g["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_workers_request_gpus_and_npu_workers_advertise_the_npu_resource():
    _, lim = _worker_resources("cbd-ray-gpu")
    assert int(lim["nvidia.com/gpu"]) >= 1
    g, lim = _worker_resources("cbd-ray-npu")
    n = int(lim["huawei.com/Ascend910"])
    assert n >= 1
    res = yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"]))  # '"{\"NPU\": 8}"'
    assert res == {"NPU": n}
    assert "npu" in g["template"]["spec"]["containers"][0]["image"]


def test_every_ray_pod_mounts_the_shared_run_volume():
    claim = next(d for d in docs().values() if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for c in clusters():
        spec = c["spec"]
        for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
            runs = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
            assert runs and mounts[runs[0]] == "/runs"


def test_rayjob_entrypoint_names_a_job_and_config_that_exist():
    job = docs()["RayJob/cbd-build-chain"]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] in {c["metadata"]["name"] for c in clusters()}
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python"
    script = Path(argv[1])
    assert script.name == "build_chain.py" and (ROOT / "jobs" / script.name).is_file()
    cfg = Path(argv[argv.index("--config") + 1])
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    load_config(ROOT / "configs" / cfg.name, overrides)  # the config and its overrides validate
    assert argv[argv.index("--storage") + 1] == "/runs"
    yaml.safe_load(job["runtimeEnvYAML"])


def test_local_scripts_bind_loopback():
    start = (ROOT / "cluster" / "local" / "start.sh").read_text()
    assert "--node-ip-address=127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in start
    assert '"$RAY" stop' in (ROOT / "cluster" / "local" / "stop.sh").read_text()
