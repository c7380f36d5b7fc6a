"""The KubeRay manifests are ones the current operator accepts, and they say what the project
means (GPUs and NPUs on the workers, the shared run volume, token authentication everywhere).

Two checks stand in for the cluster:

* **The CRD schemas.** Each RayCluster and RayJob is validated with ``jsonschema`` against the
  ``openAPIV3Schema`` of the KubeRay CRDs, copied unchanged into ``tests/data/kuberay/`` (the
  files name the KubeRay commit: 1.7.0-rc.0 + 5). The API server *prunes* unknown fields of a
  structural schema instead of rejecting them, so a misspelt field would silently do nothing;
  these tests are stricter on purpose: wherever a schema lists ``properties`` (and neither
  ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` allows more), an unknown
  field is an error. ``nullable`` and ``x-kubernetes-int-or-string`` keep their Kubernetes
  meaning; the other ``x-kubernetes-*`` markers (list types, CEL rules, which only apply to
  fields these manifests do not set) are not checked.
* **The operator's own rules**, which no schema shows: a small re-implementation of those in
  ray-operator/controllers/ray/utils/validation.go (same commit) that can apply to these
  manifests, e.g. a TTL needs ``shutdownAfterJobFinishes: true`` (KubeRay >= 1.4 marks such a
  RayJob ValidationFailed). Rules behind feature gates, for fields not used here (deletion
  rules, GCS fault tolerance, TLS, network policy, history server) are left out.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from cbd_ray.schema import load_config

from conftest import ROOT

KUBE = ROOT / "cluster" / "kuberay"
SCHEMAS = ROOT / "tests" / "data" / "kuberay"
AUTH_SECRET = {"name": "cbd-ray-auth", "key": "auth_token"}
RAY_KINDS = ("RayCluster", "RayJob")


@functools.lru_cache(maxsize=1)
def docs() -> dict[str, dict]:
    """Every object of cluster/kuberay/*.yaml, keyed "Kind/name" (shared: tests mutate deep copies only)."""
    out = {}
    for f in sorted(KUBE.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                out[f"{d['kind']}/{d['metadata']['name']}"] = d
    return out


def ray_objects() -> list[str]:
    return [k for k in docs() if k.split("/")[0] in RAY_KINDS]


# ---------------------------------------------------------------- CRD schemas, strictly


def strict(s: dict) -> dict:
    """The structural schema ``s`` as plain JSON Schema, with unknown fields forbidden
    wherever properties are listed (see the module docstring)."""
    s = dict(s)
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for k in ("anyOf", "allOf", "oneOf"):
        if k in s:
            s[k] = [strict(x) for x in s[k]]
    return s


_VALIDATORS: dict[str, jsonschema.Draft7Validator] = {}


def validator(kind: str) -> jsonschema.Draft7Validator:
    if kind not in _VALIDATORS:
        raw = json.loads((SCHEMAS / f"{kind.lower()}-v1.schema.json").read_text())
        _VALIDATORS[kind] = jsonschema.Draft7Validator(strict(raw))
    return _VALIDATORS[kind]


def schema_errors(obj: dict) -> list[str]:
    """One line per violation: the field path and jsonschema's message."""
    errs = validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs)


def test_strict_schema_keeps_kubernetes_meaning():
    s = strict({"type": "object", "properties": {
        "a": {"type": "string", "nullable": True},
        "q": {"x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
        "m": {"type": "object", "additionalProperties": {"type": "string"}}}})
    v = jsonschema.Draft7Validator(s)
    assert v.is_valid({"a": None, "q": "8Gi", "free": {"anything": 1}, "m": {"k": "v"}})
    assert v.is_valid({"q": 3})
    assert not v.is_valid({"q": 1.5}) and not v.is_valid({"m": {"k": 1}}) and not v.is_valid({"b": 1})


@pytest.mark.parametrize("name", ray_objects())
def test_manifest_matches_the_kuberay_crd_schema(name):
    assert schema_errors(docs()[name]) == []


@pytest.mark.parametrize("path, value, needle", [
    (("spec", "shutdownAfterJobFinish"), True, "shutdownAfterJobFinish"),               # misspelt
    (("spec", "submitterPodTemplate", "spec", "containers", 0, "envv"), [], "envv"),   # deep in the pod
])
def test_schema_check_fails_on_an_unknown_rayjob_field(path, value, needle):
    job = copy.deepcopy(docs()["RayJob/cbd-build-chain"])
    _set(job, path, value)
    errs = schema_errors(job)
    assert errs and needle in " ".join(errs) and "not allowed" in " ".join(errs)


def test_schema_check_fails_on_an_unknown_raycluster_field():
    c = copy.deepcopy(docs()["RayCluster/cbd-ray-gpu"])
    c["spec"]["workerGroupSpecs"][0]["replica"] = 2
    assert any("'replica' was unexpected" in e for e in schema_errors(c))


@pytest.mark.parametrize("name, path, value", [
    ("RayJob/cbd-build-chain", ("spec", "ttlSecondsAfterFinished"), "1d"),
    ("RayJob/cbd-build-chain", ("spec", "shutdownAfterJobFinishes"), "yes"),
    ("RayCluster/cbd-ray-gpu", ("spec", "workerGroupSpecs", 0, "replicas"), "2"),
    ("RayCluster/cbd-ray-gpu", ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # KubeRay wants strings
])
def test_schema_check_fails_on_a_wrong_type(name, path, value):
    obj = copy.deepcopy(docs()[name])
    _set(obj, path, value)
    errs = schema_errors(obj)
    assert any(e.startswith(".".join(map(str, path)) + ":") and "is not of type" in e for e in errs), errs


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


# ---------------------------------------------------------------- the operator's rules

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47  # utils/constant.go: the operator's suffixes must fit


def name_problems(kind: str, name: str, limit: int) -> list[str]:
    out = []
    if len(name) > limit:
        out.append(f"{kind} name should be no more than {limit} characters")
    if not DNS1035.fullmatch(name) or len(name) > 63:
        out.append(f"{kind} name should be a valid DNS1035 label: {name!r}")
    return out


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def group_problems(label: str, group: dict) -> list[str]:
    """validateRayGroupResources and validateRayGroupLabels for one head or worker group."""
    params, out = group.get("rayStartParams", {}), []
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        out.append(f"resource fields should not be set in both rayStartParams and Resources for {label} group")
    if "labels" in params:
        out.append(f"rayStartParams['labels'] is not supported for {label} group")
    return out


def worker_problems(g: dict, autoscaling: bool) -> list[str]:
    name, lo, hi = g.get("groupName"), g.get("minReplicas"), g.get("maxReplicas")
    out = [] if g["template"]["spec"].get("containers") else ["workerGroupSpec should have at least one container"]
    if not autoscaling and (lo is None or hi is None):
        out.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
    out += [f"worker group {name} has negative {k}" for k, v in (("minReplicas", lo), ("maxReplicas", hi))
            if v is not None and v < 0]
    if lo is not None and hi is not None and lo > hi:
        out.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}")
    if g.get("idleTimeoutSeconds") is not None:
        out.append(f"worker group {name}: idleTimeoutSeconds needs autoscaler v2 (not checked here)")
    return out + group_problems(name, g)


def raycluster_spec_problems(spec: dict) -> list[str]:
    """ValidateRayClusterSpec, the rules that can apply to these manifests."""
    head = spec["headGroupSpec"]
    containers = head["template"]["spec"].get("containers", [])
    if not containers:
        return ["headGroupSpec should have at least one container"]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    out = group_problems("Head", head)
    for g in spec.get("workerGroupSpecs", []):
        out += worker_problems(g, autoscaling)
    env = _env(containers[0])
    if "RAY_REDIS_ADDRESS" in env and not spec.get("gcsFaultToleranceOptions"):
        out.append("RAY_REDIS_ADDRESS is set, which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not set")
    if head.get("rayStartParams", {}).get("redis-username") or "REDIS_USERNAME" in env:
        out.append("cannot set redis username in rayStartParams or environment variables")
    if not autoscaling and env.get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true"):
        out.append("RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false")
    if (spec.get("authOptions") or {}).get("mode", "token") == "token" and spec.get("authOptions") is not None:
        if _version(spec.get("rayVersion", "0")) < (2, 52, 0):
            out.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def rayjob_problems(job: dict) -> list[str]:
    """ValidateRayJobMetadata + ValidateRayJobSpec, the rules that can apply here."""
    s, out = job["spec"], name_problems("RayJob", job["metadata"]["name"], MAX_RAYJOB_NAME)
    shutdown, selector = s.get("shutdownAfterJobFinishes", False), s.get("clusterSelector") or {}
    mode, backoff = s.get("submissionMode", "K8sJobMode"), s.get("backoffLimit")
    if s.get("suspend") and not shutdown:
        out.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    if s.get("ttlSecondsAfterFinished", 0) < 0:
        out.append("TTLSecondsAfterFinished must be a non-negative integer")
    if not shutdown and s.get("ttlSecondsAfterFinished", 0) > 0:
        out.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
    if s.get("deletionStrategy") is not None:
        out.append("deletionStrategy is not checked here (rules mode and legacy policies)")
    if s.get("suspend") and selector:
        out.append("the ClusterSelector mode doesn't support the suspend operation")
    if not s.get("rayClusterSpec") and not selector:
        out.append("one of RayClusterSpec or ClusterSelector must be set")
    if selector:
        out += [m for bad, m in (
            (not selector.get("ray.io/cluster"), "cluster name in ClusterSelector should not be empty"),
            (mode == "SidecarMode", "ClusterSelector is not supported in SidecarMode"),
            ((backoff or 0) > 0, "BackoffLimit is incompatible with ClusterSelector mode")) if bad]
    if mode == "InteractiveMode" and (backoff or 0) > 0:
        out.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and (s.get("submitterPodTemplate") or s.get("submitterConfig")):
        out.append("Currently, SidecarMode doesn't support SubmitterPodTemplate or SubmitterConfig")
    if s.get("rayClusterSpec"):
        out += raycluster_spec_problems(s["rayClusterSpec"])
    if not isinstance(yaml.safe_load(s.get("runtimeEnvYAML") or "{}"), dict):
        out.append("runtimeEnvYAML is not a YAML mapping")
    out += [f"{k} must be a positive integer" for k in ("activeDeadlineSeconds", "preRunningDeadlineSeconds")
            if s.get(k) is not None and s[k] <= 0]
    if backoff is not None and backoff < 0:
        out.append("backoffLimit must be a positive integer")
    return out


def operator_problems(obj: dict) -> list[str]:
    if obj["kind"] == "RayJob":
        return rayjob_problems(obj)
    return name_problems("RayCluster", obj["metadata"]["name"], MAX_RAYCLUSTER_NAME) + raycluster_spec_problems(obj["spec"])


@pytest.mark.parametrize("name", ray_objects())
def test_manifest_passes_the_operator_rules(name):
    assert operator_problems(docs()[name]) == []


def test_operator_rules_fail_on_a_ttl_without_shutdown():
    job = copy.deepcopy(docs()["RayJob/cbd-build-chain"])
    job["spec"]["shutdownAfterJobFinishes"] = False
    assert operator_problems(job) == [
        "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"]
    del job["spec"]["shutdownAfterJobFinishes"]  # the default is false too
    assert operator_problems(job)
    assert schema_errors(job) == []  # the schema alone cannot see this


@pytest.mark.parametrize("mutate, needle", [
    (lambda j: j["spec"].pop("clusterSelector"), "one of RayClusterSpec or ClusterSelector"),
    (lambda j: j["spec"].update(suspend=True), "doesn't support the suspend"),
    (lambda j: j["spec"].update(backoffLimit=2), "BackoffLimit is incompatible with ClusterSelector"),
    (lambda j: j["metadata"].update(name="cbd_build_chain"), "DNS1035"),
    (lambda j: j["spec"].update(runtimeEnvYAML="- a list"), "runtimeEnvYAML"),
])
def test_operator_rules_fail_on_other_rayjob_rules(mutate, needle):
    job = copy.deepcopy(docs()["RayJob/cbd-build-chain"])
    mutate(job)
    assert any(needle in p for p in operator_problems(job))


def test_operator_rules_fail_on_replica_bounds():
    c = copy.deepcopy(docs()["RayCluster/cbd-ray-gpu"])
    g = c["spec"]["workerGroupSpecs"][0]
    g["minReplicas"], g["maxReplicas"] = 5, 4
    assert operator_problems(c) == ["worker group gpu has minReplicas 5 greater than maxReplicas 4"]
    del g["maxReplicas"]
    assert "must set both minReplicas and maxReplicas" in operator_problems(c)[0]


# ---------------------------------------------------------------- what the project means


def test_every_manifest_has_a_known_kind():
    kinds = {k.split("/")[0] for k in docs()}
    assert kinds == {"RayCluster", "RayJob", "PersistentVolumeClaim"}


def _ray_containers(obj: dict) -> dict[str, dict]:
    """Every container that talks to Ray: head, workers, and the RayJob's submitter."""
    if obj["kind"] == "RayJob":
        return {"submitter": c for c in obj["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    spec = obj["spec"]
    out = {f"head/{c['name']}": c for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for g in spec["workerGroupSpecs"]:
        out.update({f"{g['groupName']}/{c['name']}": c for c in g["template"]["spec"]["containers"]})
    return out


@pytest.mark.parametrize("name", ray_objects())
def test_every_ray_container_uses_token_auth_from_the_secret(name):
    for where, c in _ray_containers(docs()[name]).items():
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == AUTH_SECRET, where
        assert "value" not in env["RAY_AUTH_TOKEN"], where  # never a literal token in a manifest


def test_the_secret_example_holds_the_key_the_pods_read_and_no_token():
    secret = yaml.safe_load((KUBE / "secret-auth.yaml.example").read_text())
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", AUTH_SECRET["name"])
    assert set(secret["stringData"]) == {AUTH_SECRET["key"]}
    assert secret["stringData"][AUTH_SECRET["key"]].startswith("REPLACE-")
    readme = (KUBE / "README.md").read_text()
    assert f"kubectl create secret generic {AUTH_SECRET['name']} --from-literal={AUTH_SECRET['key']}=" in readme


def test_dashboard_stays_inside_the_cluster():
    for name in ray_objects():
        head = docs()[name]["spec"].get("headGroupSpec")
        if head:
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")


def _worker(name: str) -> tuple[dict, dict]:
    g = docs()[f"RayCluster/{name}"]["spec"]["workerGroupSpecs"][0]
    return g, g["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_workers_request_gpus_and_npu_workers_advertise_the_npu_resource():
    _, lim = _worker("cbd-ray-gpu")
    assert int(lim["nvidia.com/gpu"]) >= 1
    g, lim = _worker("cbd-ray-npu")
    n = int(lim["huawei.com/Ascend910"])
    res = yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"]))  # '"{\"NPU\": 8}"'
    assert n >= 1 and res == {"NPU": n}
    assert "npu" in g["template"]["spec"]["containers"][0]["image"]


def test_every_ray_pod_mounts_the_shared_run_volume():
    claim = next(d for d in docs().values() if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for c in (d for d in docs().values() if d["kind"] == "RayCluster"):
        spec = c["spec"]
        for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
            runs = [n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
            assert runs and mounts[runs[0]] == "/runs"


def test_rayjob_runs_a_job_and_config_that_exist_on_a_cluster_we_ship():
    job = docs()["RayJob/cbd-build-chain"]["spec"]
    cluster = docs()[f"RayCluster/{job['clusterSelector']['ray.io/cluster']}"]
    head_image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert job["submitterPodTemplate"]["spec"]["containers"][0]["image"] == head_image  # same Ray version
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and Path(argv[1]).name == "build_chain.py" and (ROOT / "jobs" / "build_chain.py").is_file()
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    load_config(ROOT / "configs" / Path(argv[argv.index("--config") + 1]).name, overrides)
    assert argv[argv.index("--storage") + 1] == "/runs"


# ---------------------------------------------------------------- images

# torch-npu's documented combinations (Ascend/pytorch COMPATIBILITY.md, TorchNPU 26.1.0 and
# 26.0.0): torch-npu package version -> (torch, CANN).
TORCH_NPU_TABLE = {"2.12.0": ("2.12.0", "9.1.0"), "2.11.0": ("2.11.0", "9.1.0"),
                   "2.10.0.post4": ("2.10.0", "9.1.0"), "2.10.0": ("2.10.0", "9.0.0")}


def _pins() -> dict[str, str]:
    lines = (ROOT / "requirements-cpu.txt").read_text().splitlines()
    return {m[1]: m[2] for m in (re.match(r"([a-z-]+)(?:\[.*\])?==(\S+)", ln) for ln in lines) if m}


def _stage_args(stage: str) -> dict[str, str]:
    """ARG defaults visible in one Dockerfile stage (global ARGs included), and its base image."""
    text = (KUBE / "Dockerfile").read_text()
    glob = dict(re.findall(r"^ARG (\w+)=(\S+)", text.split("\nFROM ")[0], re.M))
    body = re.search(rf"^FROM (\S+) AS {stage}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    args = {**glob, **dict(re.findall(r"^ARG (\w+)=(\S+)", body[2], re.M))}
    return {**args, "FROM": re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], body[1])}


def test_images_pin_the_ray_and_torch_that_the_tests_run():
    pins, gpu, npu = _pins(), _stage_args("gpu"), _stage_args("npu")
    assert gpu["RAY_VERSION"] == npu["RAY_VERSION"] == pins["ray"]
    assert gpu["TORCH_VERSION"] == pins["torch"]
    assert gpu["FROM"] == f"rayproject/ray:{pins['ray']}-py311-gpu"


def test_ascend_image_is_a_combination_torch_npu_documents():
    npu = _stage_args("npu")
    torch, cann = TORCH_NPU_TABLE[npu["TORCH_NPU_VERSION"]]
    assert npu["TORCH_VERSION"] == torch
    assert npu["FROM"].split(":")[1].startswith(f"{cann}-")


def test_dockerignore_keeps_environments_runs_and_tokens_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".git", "**/__pycache__", "out", "**/auth_token"} <= ignored


def test_local_scripts_bind_loopback_and_never_stop_every_ray():
    start = (ROOT / "cluster" / "local" / "start.sh").read_text()
    assert "--node-ip-address=127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in start and "RAY_AUTH_MODE=token" in start
    code = [ln for ln in (ROOT / "cluster" / "local" / "stop.sh").read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not any(re.search(r"\bray\"?\s+stop\b", ln) for ln in code)


def test_local_start_refuses_a_bad_port_before_starting_anything(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CBD_RAY_DIR": str(tmp_path / "head"), "CBD_RAY_AGENT_PORT": "52365x"}
    r = subprocess.run([str(ROOT / "cluster" / "local" / "start.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "start.sh: CBD_RAY_AGENT_PORT=52365x is not a port; give an integer from 1 to 65535"]
    assert not (tmp_path / "head").exists()
