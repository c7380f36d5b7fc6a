"""Several Ray nodes on loopback, started once for this module: a head with no CPUs for work
(as a KubeRay head without accelerators) and worker nodes with their own CPUs.

- A node lost mid-grid: its targets are retried on other actors; with no node left the grid
  gives up within its bounded wait, naming the targets it lost.
- Accelerators: with a GPU resource (a count only; no CUDA here) on one worker node,
  ``device=cuda`` starts the training worker there and the failure comes from that worker,
  not from the driver; with no GPU anywhere it is refused before any work.
- Object storage and a lost node, in one run: an S3 server on loopback (moto) is the run
  directory; the driver runs in its own mount namespace with a private tmpfs as working, home
  and temp directory, so a worker that read a driver path would fail. The smoke chain with two
  Ray Train workers per step finishes while the node training chain_1 is killed and another
  joins: Ray Train restarts the worker group from the last checkpoint and the manifest says
  how many restarts it took. A second fresh driver resumes from the bucket alone and skips
  every stage; a storage that cannot be reached stops the job.

Every process this module starts is stopped by it (Cluster.shutdown, the moto server by pid).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AWS, ENV, ROOT, SMOKE_ONE_ANCHOR, free_port, init_local_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def cluster(ray_apart):
    """Head (0 CPUs) + two worker nodes (2 CPUs each). A shared local Ray of this process
    (a run without xdist) is stopped meanwhile and started again afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    ray.shutdown()
    saved = {"RAY_ADDRESS": os.environ.get("RAY_ADDRESS")}
    for k, v in AWS.items():  # the nodes inherit these: workers reach the S3 server too (kept for
        os.environ.setdefault(k, v)  # the session, as the s3_server fixture does)
    small = {"object_store_memory": 200 << 20}
    # every node's processes inherit RAY_ADDRESS, so each asks this cluster, never a Ray beside it
    # (the session's, on the other pytest worker): see cbd_ray.session.start_local_ray
    port = free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          "gcs_server_port": port, **small})
        assert c.address == os.environ["RAY_ADDRESS"], (c.address, os.environ["RAY_ADDRESS"])
        for _ in range(2):
            c.add_node(num_cpus=2, **small)
        c.wait_for_nodes()
        ray.init(address=c.address, runtime_env={"env_vars": {**{k: os.environ[k] for k in ENV}, **AWS}})
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if was_up:
            init_local_ray()


def _worker_nodes(c):
    return [n for n in c.list_all_nodes() if n is not c.head_node]


def _busiest(c):
    """The worker node with the fewest CPUs free (where the training workers are)."""
    import ray._private.state as state

    free = state.state.available_resources_per_node()
    return min(_worker_nodes(c), key=lambda n: free.get(n.node_id, {}).get("CPU", 0.0))


# --------------------------------------------------------------------------- grid + node loss


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    from cbd_ray.tiny import train_bpe_tokenizer

    from anchor_models import make_anchors

    tok = train_bpe_tokenizer(vocab_size=512)
    return make_anchors(tmp_path_factory.mktemp("anchors"), tok, families=("gpt2",))["gpt2"]


GRID = [f"{layers}x{hidden}x{hidden // 8}" for layers in (2, 3) for hidden in (32, 48, 64)]


def test_grid_retries_the_targets_of_a_lost_node(cluster, anchors, tmp_path):
    from cbd_ray.grid import Limits, run_grid

    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("[1/"):  # one target done, others in flight: lose every worker node
            for n in _worker_nodes(cluster):
                cluster.remove_node(n, allow_graceful=False)
            cluster.add_node(num_cpus=2, object_store_memory=200 << 20)

    recs = run_grid(anchors[0], anchors[1], GRID, tmp_path / "grid", num_actors=2, log=log,
                    limits=Limits(retries=2, place_timeout_s=120, poll_s=0.5))
    assert [r["status"] for r in recs] == ["ok"] * len(GRID), [r.get("error") for r in recs]
    assert any("retrying" in line for line in lines)
    assert all((tmp_path / "grid" / r["name"] / "model.safetensors").is_file() for r in recs)


def test_grid_without_any_node_gives_up_in_bounded_time(cluster, anchors, tmp_path):
    from cbd_ray.grid import Limits, run_grid

    def log(line: str) -> None:
        if line.startswith("[1/"):
            for n in _worker_nodes(cluster):
                cluster.remove_node(n, allow_graceful=False)

    t0 = time.perf_counter()
    try:
        recs = run_grid(anchors[0], anchors[1], GRID, tmp_path / "grid", num_actors=2, log=log,
                        limits=Limits(retries=1, place_timeout_s=10, poll_s=0.5))
    finally:
        for _ in range(2):
            cluster.add_node(num_cpus=2, object_store_memory=200 << 20)
    assert time.perf_counter() - t0 < 300
    failed = [r for r in recs if r["status"] != "ok"]
    assert failed and len(failed) < len(recs)  # the target finished before the loss is kept
    assert all("no node could hold an interpolation actor" in r["error"] or "lost" in r["error"].lower()
               or "died" in r["error"].lower() for r in failed)


# --------------------------------------------------------------------------- accelerators


def test_cuda_runs_on_the_gpu_node_and_fails_there_not_on_the_driver(cluster, tmp_path, tokenizer, shared_data):
    import ray.train

    from cbd_ray.errors import CBDError
    from cbd_ray.train import DistillConfig, run_distill

    from distill_models import DOLLY_TRAIN, make_pair

    teacher, student = make_pair(tmp_path / "pair", tokenizer)
    cfg = DistillConfig(objective="sft", steps=1, batch_size=2, max_len=32, device="cuda", workers=1, data_limit=8)
    with pytest.raises(CBDError, match=r"needs the Ray resource 'GPU' but the cluster has CPU=4, GPU=0"):
        run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "out", cfg, storage_path=tmp_path / "r0")
    assert not (tmp_path / "r0").exists()  # refused before any work

    gpu = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=200 << 20)
    try:
        with pytest.raises((ray.train.WorkerGroupError, ray.train.ControllerError, RuntimeError)) as err:
            run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "out", cfg,
                        storage_path=tmp_path / "r1")
    finally:
        cluster.remove_node(gpu)
    text = str(err.value)
    assert "GPU" in text or "CUDA" in text or "cuda" in text or "NCCL" in text
    assert not isinstance(err.value, CBDError)  # not the driver's refusal: the worker failed


# --------------------------------------------------------------------------- object storage


@pytest.fixture(scope="module")
def s3_bucket(s3_server):
    return f"s3://cbd-runs/cluster{s3_server}"


PRIVATE = os.geteuid() == 0 and shutil.which("unshare") is not None


def _driver(tmp_path: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """jobs/build_chain.py as its own process, its output in ``<name>.log``. As root, in its own
    mount namespace: a private tmpfs is its working, home, temp and local-runs directory,
    invisible to every Ray worker (elsewhere a directory of its own, which the workers could
    still read: the run then shows the node loss and the resume, not the isolation)."""
    priv = tmp_path / name
    priv.mkdir()
    env = {**os.environ, **AWS, "HOME": str(priv), "TMPDIR": str(priv), "CBD_LOCAL_RUNS": str(priv / "runs")}
    cmd = f"cd {priv} && exec {sys.executable} {ROOT / 'jobs' / 'build_chain.py'} " + " ".join(f"'{a}'" for a in args)
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs none {priv} && {cmd}"] \
        if PRIVATE else ["sh", "-c", cmd]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT), log


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _read_json(uri: str) -> dict:
    from cbd_ray.storage import filesystem

    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def test_s3_run_with_a_private_driver_survives_losing_the_training_node_then_a_fresh_driver_resumes(
        cluster, s3_bucket, tmp_path):
    """One run for three behaviours, to keep the suite short: the run directory is a bucket,
    the driver sees none of the workers' files, chain_1 (two Ray Train workers) loses its node
    after a checkpoint and Ray Train restarts from it; a second driver with nothing but the
    bucket then skips every stage."""
    from cbd_ray.storage import list_files, uri_join

    uri = s3_bucket
    args = ["--config", str(SMOKE), "--storage", uri, *SMOKE_ONE_ANCHOR, "scaling.workers=2",
            "scaling.max_failures=2", "anchors.0.distill.steps=24", "anchors.0.distill.checkpoint_every=4"]
    run = uri_join(uri, "smoke")
    t0 = time.perf_counter()
    first, log = _driver(tmp_path, "driver1", args)
    deadline = time.time() + 600

    def checkpointed() -> bool:
        try:
            return any(f.startswith("work/chain_1/ray_train/") and "/checkpoint_" in f for f in list_files(run))
        except Exception:  # noqa: BLE001 - the run directory may not exist yet
            return False
    while time.time() < deadline and first.poll() is None and not checkpointed():
        time.sleep(1.0)
    assert first.poll() is None and checkpointed(), "chain_1 never checkpointed: " + log.read_text()[-3000:]
    cluster.remove_node(_busiest(cluster), allow_graceful=False)
    cluster.add_node(num_cpus=2, object_store_memory=200 << 20)
    _finish(first, log)
    wall = time.perf_counter() - t0
    files = list_files(run)
    assert "manifest.json" in files and "report.md" in files
    for t in ("t-3x48", "t-2x64"):
        assert f"targets/{t}/model.safetensors" in files
    stages = _read_json(uri_join(run, "manifest.json"))["stages"]
    assert all(r["status"] == "done" for r in stages.values())
    assert stages["chain_1"]["metrics"]["restarts"] >= 1  # the manifest says what the loss cost
    assert stages["chain_1"]["metrics"]["workers"] == 2
    print(f"\n[cluster] smoke chain on S3, 2 workers/step, one node lost in chain_1: {wall:.1f}s, "
          f"restarts {stages['chain_1']['metrics']['restarts']}")

    out = _finish(*_driver(tmp_path, "driver2", args))  # another machine: nothing but the bucket
    for stage in ("data", "source", "chain_1", "grid", "evaluate", "report"):
        assert f"[{stage}] skip" in out, out[-3000:]


def test_unreachable_storage_stops_the_job_with_the_uri(cluster, tmp_path):
    dead = f"s3://cbd-runs/runs?endpoint_override=127.0.0.1%3A{free_port()}&scheme=http&region=us-east-1"
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_chain.py"), "--config", str(SMOKE),
                          "--storage", dead], env={**os.environ, **AWS, "CBD_LOCAL_RUNS": str(tmp_path / "l")},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "s3://cbd-runs/runs" in res.stderr
    assert not (tmp_path / "l").exists()  # stopped before any work
