"""Every shipped chain config validates offline, through the library and through `cbd validate`."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cbd_ray.schema import estimate_params, load_config, target_pair

from conftest import ROOT

CHAIN_CONFIGS = ["demo", "smoke", "gpt2", "pythia", "qwen3", "bridge_qwen3_gpt2", "bridge_llama3_gpt2"]


@pytest.mark.parametrize("name", CHAIN_CONFIGS)
def test_shipped_config_validates(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    chain = cfg.chain()
    sizes = [estimate_params(s, cfg.family, cfg.source.vocab()) for _, s in chain]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for t in cfg.grid.targets:
        assert target_pair(cfg, t) is not None


def test_paper_configs_name_the_papers_models_and_shapes():
    gpt2 = load_config(ROOT / "configs" / "gpt2.yaml")
    assert gpt2.source.model == "openai-community/gpt2-xl"
    assert [a.model for a in gpt2.anchors] == ["openai-community/gpt2-large", "openai-community/gpt2-medium",
                                               "openai-community/gpt2"]
    shapes = {(t.layers, t.heads, t.hidden, t.ffn) for t in gpt2.grid.targets}
    assert shapes == {(14, 12, 768, 3072), (18, 14, 896, 3584), (24, 14, 896, 3584), (26, 16, 1024, 4096),
                      (30, 18, 1152, 4608)}
    # GPT-2 XL is ~1.56B parameters, base ~124M: the estimate is within 1%
    assert abs(estimate_params(gpt2.source.shape, "gpt2", 50257) - 1.5575e9) / 1.5575e9 < 0.01
    pythia = load_config(ROOT / "configs" / "pythia.yaml")
    assert [a.model.split("-")[-1] for a in pythia.anchors] == ["1b", "410m", "160m", "70m"]
    qwen = load_config(ROOT / "configs" / "qwen3.yaml")
    assert [a.model for a in qwen.anchors] == ["Qwen/Qwen3-1.7B", "Qwen/Qwen3-0.6B"]
    for name, teacher in (("bridge_qwen3_gpt2", "Qwen/Qwen3-4B"), ("bridge_llama3_gpt2", "meta-llama/Meta-Llama-3-8B")):
        b = load_config(ROOT / "configs" / f"{name}.yaml")
        assert b.bridge.teacher.model == teacher and b.source.model == "openai-community/gpt2-xl"


def test_demo_is_offline_and_big_enough():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.source.tiny is not None and cfg.data.instructions == "builtin" and cfg.data.text == "builtin"
    assert len(cfg.anchors) >= 3 - 1 and len(cfg.chain()) >= 3
    assert len(cfg.grid.targets) >= 4 and cfg.evaluation.heldout


def test_cbd_validate_command_exits_zero_on_shipped_and_two_on_bad(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "cbd_ray.cli", "validate", str(ROOT / "configs" / "gpt2.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "gpt2-537M" in ok.stdout and "between gpt2-large > gpt2-medium" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cbd_ray.cli", "validate", str(ROOT / "configs" / "smoke.yaml"),
                          "grid.actors=0", "anchors.0.shape.heads=5"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert "grid.actors" in bad.stderr and "anchors.0.shape" in bad.stderr
