"""Shared fixtures. Three tiers: pure CPU (no marker), local Ray (``ray_session``), GPU
(``@pytest.mark.gpu``, skipped without CUDA).

One local Ray is shared by the whole session. A file lock keeps two pytest sessions on one
machine apart (``machine_lock``); within one session, the tests that start a Ray of their own
(``ray_apart``) run beside the shared one, each cluster's processes knowing its own address
(cbd_ray.session.start_local_ray).
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    # Ray Train's controller polls its workers every 2 s by default, so every run (and every
    # restart) ends up to 2 s after its workers did; a missed poll is only counted, not fatal
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    # Ray kills a task's worker process after 1 s idle, and the next task starts a new one that
    # imports torch and transformers again (~5 s of CPU); the tests' tasks come in bursts a few
    # seconds apart. Kept a minute, at most num_cpus idle ones (Ray's soft limit): the tiny
    # comparison ran in 100 s instead of 132 s, 5 worker processes instead of 12.
    "RAY_idle_worker_killing_time_threshold_ms": os.environ.get("RAY_idle_worker_killing_time_threshold_ms", "60000"),
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/cbd_ray/torch_extensions"))

ROOT = Path(__file__).resolve().parents[1]  # the project
SHARED_DATA = ROOT.parent / "shared" / "data"
if not SHARED_DATA.is_dir():  # a clone elsewhere: allow an explicit location
    SHARED_DATA = Path(os.environ.get("CBD_SHARED_DATA", str(SHARED_DATA)))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
    groups = getattr(config, "workerinput", {}).get("cbd_ray_groups")
    if groups:  # an xdist worker: tell the scheduler which tests need Ray (see below)
        ids = {kind: [item.nodeid for item in items if fixture in item.fixturenames]
               for kind, fixture in (("ray", "ray_lock"), ("apart", "ray_apart"))}
        tmp = Path(groups) / f".{config.workerinput['workerid']}.tmp"
        tmp.write_text(json.dumps(ids))
        tmp.replace(Path(groups) / f"{config.workerinput['workerid']}.json")


# pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): the suite is two work units. Every test
# of the shared local Ray (the ray_lock fixture, also through ray_session and ray_clean) runs on
# one worker, in collection order; every other test on the other worker, among them the few that
# start a Ray of their own (ray_apart: a multi-node cluster, a `ray start` head, an installed
# command), so the two Rays run side by side and no Ray-free test shares a process with a Ray an
# earlier test started. The workers collect, the controller schedules: each worker writes the ids
# of its Ray tests to a file in a folder the controller names; the controller takes the machine's
# lock for the whole session and says so in that folder. (xdist's own loadgroup reads
# xdist_group marks but renames node ids through an attribute pytest 9 no longer has.)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    config = node.config
    if not hasattr(config, "_cbd_ray_groups"):
        import tempfile

        config._cbd_ray_groups = tempfile.mkdtemp(prefix="cbd-xdist-groups-")
    node.workerinput["cbd_ray_groups"] = config._cbd_ray_groups


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # plain `-n 2` (dist "load") too: Ray tests on two workers would wait for each other's lock
    if config.getoption("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayApart(LoadScopeScheduling):
        """Two scopes: "ray" (the tests the workers listed) and "cpu" (the rest)."""

        ray_ids: set[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.ray_ids is None:  # first called once every worker has collected, before any runs
                folder = Path(config._cbd_ray_groups)
                lists = [json.loads(f.read_text()) for f in folder.glob("*.json")]
                self.ray_ids = {i for ids in lists for i in ids["ray"]}
                if (self.ray_ids or any(ids["apart"] for ids in lists)) and not _lock_held_outside():
                    config._cbd_ray_lock = _take_machine_lock()
                    (folder / LOCK_HELD).touch()
            return "ray" if nodeid in self.ray_ids else "cpu"

    return RayApart(config, log)


def pytest_unconfigure(config):
    if hasattr(config, "_cbd_ray_lock"):
        _release(config._cbd_ray_lock)
    if hasattr(config, "_cbd_ray_groups"):
        import shutil

        shutil.rmtree(config._cbd_ray_groups, ignore_errors=True)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a loaded machine the thread
    hand-offs dominate; restored afterwards for the rest of the suite."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE tokenizer (vocab 512) trained on Python's own docs."""
    from cbd_ray.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer(vocab_size=512)


@pytest.fixture(scope="module")
def anchors(tmp_path_factory, tokenizer):
    """A small and a large tiny anchor of every family (anchor_models.make_anchors), made
    once per test module: alignment tests write lineage files beside them, so modules do not
    share them."""
    from anchor_models import make_anchors

    return make_anchors(tmp_path_factory.mktemp("anchors"), tokenizer)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A small (2x32, 2 heads, seed 0) and a large (4x64, 4 heads, seed 1) tiny GPT-2, made
    once per test module: the anchors of the grid and α-search tests."""
    from cbd_ray.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("gpt2_pair")
    small = save_tiny_model(root / "small", "gpt2", tokenizer=tokenizer, seed=0, layers=2, hidden=32, heads=2)
    large = save_tiny_model(root / "large", "gpt2", tokenizer=tokenizer, seed=1, layers=4, hidden=64, heads=4)
    return small, large


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data):
    from cbd_ray.tiny import gpt2_tokenizer

    return gpt2_tokenizer(shared_data / "gpt2_tokenizer")


LOCK = "/tmp/cbd_ray_tests.lock"
LOCK_HELD = "machine_lock_held"  # in the xdist groups folder: the controller holds LOCK


def _lock_held_outside() -> bool:
    """`flock /tmp/cbd_ray_tests.lock env CBD_RAY_LOCK_HELD=1 pytest ...` holds it already."""
    return os.environ.get("CBD_RAY_LOCK_HELD") == "1"


def _take_machine_lock():
    lock = open(LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _release(lock) -> None:
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


@pytest.fixture(scope="session")
def machine_lock(request):
    """The machine's Ray lock (/tmp/cbd_ray_tests.lock), held from the first test that needs a
    Ray to the session's end: another pytest session on this machine waits, so two sessions
    never run their Rays at once. Already held by `flock /tmp/cbd_ray_tests.lock ...`
    (CBD_RAY_LOCK_HELD=1) or by the xdist controller for its workers."""
    groups = getattr(request.config, "workerinput", {}).get("cbd_ray_groups")
    if _lock_held_outside() or (groups and (Path(groups) / LOCK_HELD).exists()):
        yield
        return
    lock = _take_machine_lock()
    try:
        yield
    finally:
        _release(lock)


@pytest.fixture(scope="session")
def ray_lock(machine_lock):
    """For tests of the session's shared local Ray (through ray_session, ray_clean): under
    xdist they all run on one worker, one at a time."""
    yield


@pytest.fixture(scope="session")
def ray_apart(machine_lock):
    """For tests that start a Ray of their own (a multi-node cluster, a `ray start` head, an
    installed command): under xdist they run on the other worker, beside the shared Ray."""
    yield


def init_local_ray():
    """The session's local Ray (2 CPUs, 1 GiB object store); also restarted by
    tests/cluster/test_cluster.py after its multi-node cluster."""
    import ray

    from cbd_ray.session import start_local_ray

    if not ray.is_initialized():  # its processes know its address: another Ray may run beside it
        start_local_ray(num_cpus=2, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=True,
                        env_vars={k: os.environ[k] for k in ENV})
    return ray


@pytest.fixture(scope="session")
def ray_session(ray_lock):
    """One local Ray for the whole test session."""
    import ray

    try:
        yield init_local_ray()
    finally:
        ray.shutdown()


@pytest.fixture
def ray_clean(ray_session):
    """Use inside Ray tests: removes leftover placement groups afterwards so a failed run
    cannot hold both CPUs and hang the tests after it."""
    yield ray_session
    from ray.util.placement_group import placement_group_table, remove_placement_group, PlacementGroup

    for pg_id, info in placement_group_table().items():
        if info.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray_session._raylet.PlacementGroupID.from_hex(pg_id)))
            except Exception:  # noqa: BLE001
                pass


#: configs/smoke.yaml cut to one anchor and the two targets between it and the source: one
#: Ray Train stage instead of two, for tests about where and how the chain runs, not its length
SMOKE_ONE_ANCHOR = ["anchors=[{name: a1, shape: {layers: 2, hidden: 48, heads: 3}}]",
                    "grid.targets=[{name: t-3x48, layers: 3, hidden: 48, heads: 3, ffn: 192}, "
                    "{name: t-2x64, layers: 2, hidden: 64, heads: 4, ffn: 256}]"]

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on loopback (moto), with the bucket ``cbd-runs``; yields the
    query string pyarrow needs to reach it. Stopped by its pid at the end of the session."""
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    port = free_port()
    for k, v in AWS.items():
        os.environ.setdefault(k, v)
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        for _ in range(150):
            try:
                fs.create_dir("cbd-runs")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the moto S3 server did not start")
        yield f"?endpoint_override=127.0.0.1%3A{port}&scheme=http&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
