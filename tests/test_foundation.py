"""The shared foundation: config loading and overrides, atomic storage, devices, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbd_ray import config, devices, storage
from cbd_ray.errors import ConfigError


class Inner(config.Strict):
    lr: float = 1e-3
    steps: int = 10


class Outer(config.Strict):
    name: str
    inner: Inner = Inner()
    tags: list[str] = []


def test_unknown_key_is_rejected_with_its_dotted_path():
    with pytest.raises(ConfigError, match=r"inner\.stpes: unknown key"):
        config.build(Outer, {"name": "x", "inner": {"stpes": 3}})


def test_dotted_overrides_parse_yaml_values():
    data = config.apply_overrides({"name": "x"}, ["inner.steps=7", "inner.lr=2e-4", "tags=[a, b]"])
    cfg = config.build(Outer, data)
    assert cfg.inner.steps == 7 and cfg.inner.lr == pytest.approx(2e-4) and cfg.tags == ["a", "b"]


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        config.apply_overrides({}, ["inner.steps"])


def test_load_reports_missing_and_non_mapping_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(Outer, bad)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with storage.atomic_directory(final) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_to_overwrite_unless_asked(tmp_path: Path):
    final = tmp_path / "model"
    with storage.atomic_directory(final) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(FileExistsError):
        with storage.atomic_directory(final) as tmp:
            (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first"
    with storage.atomic_directory(final, overwrite=True) as tmp:
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_checksums_detect_a_changed_file(tmp_path: Path):
    (tmp_path / "x").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y").write_bytes(b"def")
    sums = storage.dir_checksums(tmp_path)
    assert set(sums) == {"x", os.path.join("sub", "y")}
    assert storage.verify_checksums(tmp_path, sums) == []
    (tmp_path / "x").write_bytes(b"abd")
    assert storage.verify_checksums(tmp_path, sums) == ["x"]


def test_atomic_write_json_replaces_whole_file(tmp_path: Path):
    p = tmp_path / "m.json"
    storage.atomic_write_json(p, {"a": 1})
    storage.atomic_write_json(p, {"b": 2})
    assert p.read_text().strip() == '{\n  "b": 2\n}'


def test_unwritable_storage_root_is_reported(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "file"
            target.write_text("x")
            with pytest.raises(PermissionError, match="cannot be written"):
                storage.check_writable(target / "run")
        else:
            with pytest.raises(PermissionError, match="cannot be written"):
                storage.check_writable(ro / "run")
    finally:
        ro.chmod(0o700)


def test_device_resolution_on_cpu_and_bad_kinds():
    spec = devices.resolve("cpu")
    assert spec.kind == "cpu" and spec.backend == "gloo" and spec.ray_resource is None
    with pytest.raises(ValueError, match="not one of"):
        devices.resolve("tpu")
    if not devices.npu_available():
        with pytest.raises(RuntimeError, match="torch-npu is not installed"):
            devices.resolve("npu")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3"])
def test_tiny_models_of_every_family_load_back(tmp_path: Path, tokenizer, family: str):
    import torch
    from transformers import AutoModelForCausalLM

    from cbd_ray.tiny import save_tiny_model

    out = save_tiny_model(tmp_path / family, family, tokenizer=tokenizer, layers=2, hidden=32, heads=4)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_gpt2_tokenizer_from_files_encodes_text(gpt2_tokenizer):
    ids = gpt2_tokenizer("Hello world")["input_ids"]
    assert ids == [15496, 995]
