"""Devices: "cpu" resolves to gloo, unknown kinds and a missing torch-npu are refused; the
bridge's teacher actors on GPU, NPU and CPU clusters (no Ray, no accelerator: the
cluster's resources are a dict, the actor's device calls are recorded)."""
from __future__ import annotations

import pytest

from cbd_ray import devices
from cbd_ray.errors import CBDError
from cbd_ray.stages import bridge


def test_actor_request_follows_the_cluster():
    npu_cluster = {"CPU": 8, "NPU": 16}
    assert bridge.actor_request("auto", npu_cluster) == ("npu", {"resources": {"NPU": 1}})
    assert bridge.actor_request("npu", npu_cluster, per_actor=2) == ("npu", {"resources": {"NPU": 2}})
    assert bridge.actor_request("auto", {"CPU": 8, "GPU": 4}, per_actor=0.5) == ("cuda", {"num_gpus": 0.5})
    assert bridge.actor_request("auto", {"CPU": 8}) == ("cpu", {})
    assert bridge.actor_request("cpu", npu_cluster, per_actor=1) == ("cpu", {})
    with pytest.raises(CBDError, match="needs the Ray resource 'NPU'"):
        bridge.actor_request("npu", {"CPU": 8, "GPU": 4})


def test_generate_answers_asks_ray_for_an_npu_and_passes_only_the_kind(monkeypatch, tmp_path):
    """On an NPU cluster each actor requests {"NPU": n} and gets the kind "npu": the torch
    device is resolved on the actor, never on the driver (which has no NPU)."""
    import ray
    import ray.data

    seen = {}

    class Stop(Exception):
        pass

    class FakeDataset:
        def map_batches(self, fn, **kw):
            seen.update(kw, fn=fn)
            raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "NPU": 8.0})
    monkeypatch.setattr(ray.data, "from_items", lambda rows: FakeDataset())
    with pytest.raises(Stop):
        bridge.generate_answers("teacher-dir", [{"instruction": "Say hi."}], tmp_path / "out", actors=2,
                                log=lambda s: None)
    assert seen["fn"] is bridge.TeacherAnswerer
    assert seen["resources"] == {"NPU": 1} and "num_gpus" not in seen
    assert seen["fn_constructor_kwargs"]["device"] == "npu"


def test_an_npu_actor_resolves_its_card_on_itself(monkeypatch):
    calls = []
    import cbd_ray.devices as devices
    import cbd_ray.evaluate as evaluate
    import cbd_ray.storage as storage

    class Tok:
        padding_side = "right"

    monkeypatch.setattr(devices, "worker_device", lambda kind: calls.append(("worker_device", kind)) or "npu:0")
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: calls.append(("load_model", device)) or (None, Tok()))
    monkeypatch.setattr(storage, "materialize", lambda ref: ref)
    actor = bridge.TeacherAnswerer("teacher-dir", 8, 1.0, 1.0, 0, device="npu", seed=0, batch_size=2)
    assert calls == [("worker_device", "npu"), ("load_model", "npu")]
    assert actor.tok.padding_side == "left"


def test_device_resolution_on_cpu_and_bad_kinds():
    spec = devices.resolve("cpu")
    assert spec.kind == "cpu" and spec.backend == "gloo" and spec.ray_resource is None
    with pytest.raises(ValueError, match="not one of"):
        devices.resolve("tpu")
    if not devices.npu_available():
        with pytest.raises(RuntimeError, match="torch-npu is not installed"):
            devices.resolve("npu")
