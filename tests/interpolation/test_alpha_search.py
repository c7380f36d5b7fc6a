"""grid.alpha: search (cbd_ray.alpha_search): both endpoints are always candidates, the pick
is never worse on validation than either of them, only the validation text is read, and the
default α resolves to search exactly when the chain keeps validation text."""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cbd_ray.alpha_search import choose_alpha, read_validation, search_alpha, with_endpoints
from cbd_ray.config import apply_overrides
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.schema import parse_config

from conftest import ROOT

TARGET = {"layers": 3, "hidden": 48, "heads": 3, "kv_heads": None, "ffn": 192}


@pytest.fixture(scope="module")
def smoke() -> dict:
    return yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


def val_text() -> str:
    import json

    return "\n\n".join(json.__doc__ for _ in range(4))


# ------------------------------------------------------------------ choosing


def test_endpoints_are_always_candidates_and_an_endpoint_wins_when_best():
    assert with_endpoints([0.5, 0.25, 0.5]) == [0.0, 0.25, 0.5, 1.0]
    for best in (0.0, 1.0):
        res = choose_alpha([0.5], lambda a: abs(a - best) + 1.0)
        assert res["alphas"] == [0.0, 0.5, 1.0] and res["alpha"] == best and res["val_loss"] == 1.0
    mid = choose_alpha([0.25, 0.5, 0.75], lambda a: (a - 0.5) ** 2)
    assert mid["alpha"] == 0.5 and mid["val_losses"] == [0.25, 0.0625, 0.0, 0.0625, 0.25]


def test_pick_is_never_worse_than_both_endpoints_and_skips_diverged_blends():
    rng = random.Random(0)
    for _ in range(200):
        table = {a: rng.uniform(0, 5) for a in with_endpoints([rng.random() for _ in range(4)])}
        res = choose_alpha(list(table), table.__getitem__)
        assert res["val_loss"] <= min(table[0.0], table[1.0])
        assert res["val_loss"] == min(table.values())
    res = choose_alpha([0.5], lambda a: math.nan if a == 0.5 else 3.0 - a)
    assert res["alpha"] == 1.0 and math.isnan(res["val_losses"][1])


# ------------------------------------------------------------------ blending and scoring


def test_search_alpha_blends_every_alpha_and_scores_like_the_tune_trial(gpt2_pair, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.finetune import text_loss
    from cbd_ray.interpolate import AnchorPair, Shape

    small, large = gpt2_pair
    res = search_alpha(small, large, TARGET, [0.5], val_text(), windows=4, seq_len=32)
    assert res["alphas"] == [0.0, 0.5, 1.0] and len(res["val_losses"]) == 3
    assert res["val_loss"] == min(res["val_losses"]) <= min(res["val_losses"][0], res["val_losses"][-1])
    assert res["alpha"] == res["alphas"][res["val_losses"].index(res["val_loss"])]
    out = tmp_path / "blend"  # the α = 0 blend made and scored by hand gives the same loss
    AnchorPair(str(small), str(large)).make(Shape(**{k: v for k, v in TARGET.items() if v}), out, alpha=0.0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    by_hand = text_loss(model, AutoTokenizer.from_pretrained(out), val_text(), 32, 4)
    assert by_hand == pytest.approx(res["val_losses"][0])


def test_grid_stage_search_reads_the_validation_text_only(gpt2_pair, smoke, tmp_path, monkeypatch):
    from cbd_ray.stages.chain import search_target_alphas

    small, large = gpt2_pair
    data = tmp_path / "data"
    data.mkdir()
    (data / "text_val.txt").write_text(val_text())
    (data / "text_heldout.txt").mkdir()  # poisoned test split: reading it at all raises
    read: list[str] = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (read.append(self.name), real(self, *a, **k))[1])
    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), [
        "grid.alpha=search", "data.val_fraction=0.02", "grid.search_alphas=[0.5]", "grid.search_windows=2",
        "grid.search_seq_len=32"]))
    inputs = {"data": data, "big": large, "little": small}
    logs: list[str] = []
    ctx = SimpleNamespace(inputs=inputs, ref=lambda name: str(inputs[name]), log=logs.append)
    groups = {(0, 1): [{"name": "t", **TARGET, "alpha": None}, {"name": "fixed", **TARGET, "alpha": 0.3}]}
    got = search_target_alphas(cfg, ctx, groups, ["big", "little"], None)
    assert list(got) == ["t"] and got["t"]["alphas"] == [0.0, 0.5, 1.0]  # a target's own α wins
    assert "text_heldout.txt" not in read and "text_val.txt" in read
    assert any("α search" in line and "-> α" in line for line in logs)
    with pytest.raises(CBDError, match="val_fraction"):
        read_validation(tmp_path)  # no validation text: refused, the held-out text is not a fallback


# ------------------------------------------------------------------ the default


def test_default_alpha_is_search_with_validation_text_else_auto(smoke):
    base = copy.deepcopy(smoke)
    del base["grid"]["alpha"]
    assert parse_config(copy.deepcopy(base)).grid.alpha == "auto"
    with_val = apply_overrides(copy.deepcopy(base), ["data.val_fraction=0.03"])
    assert parse_config(copy.deepcopy(with_val)).grid.alpha == "search"
    for explicit, want in (("auto", "auto"), ("0.4", 0.4), ("best", "best")):
        cfg = parse_config(apply_overrides(copy.deepcopy(with_val), [f"grid.alpha={explicit}"]))
        assert cfg.grid.alpha == want
    with pytest.raises(ConfigError, match="grid.alpha: search"):
        parse_config(apply_overrides(copy.deepcopy(base), ["grid.alpha=search"]))
    with pytest.raises(ConfigError, match="search_alphas"):
        parse_config(apply_overrides(copy.deepcopy(with_val), ["grid.search_alphas=[1.5]"]))
    with pytest.raises(ConfigError, match="val_fraction"):
        parse_config(apply_overrides(copy.deepcopy(with_val), ["data.val_fraction=0.98"]))


def test_stage_hashes_of_configs_without_the_search_are_unchanged(smoke):
    from cbd_ray.stages.chain import build_stages

    cfg = parse_config(copy.deepcopy(smoke))
    by = {s.name: s.config for s in build_stages(cfg)}
    assert "val_fraction" not in by["data"]["data"]
    assert not {"search_alphas", "search_windows", "search_seq_len"} & set(by["grid"]["grid"])
    on = parse_config(apply_overrides(copy.deepcopy(smoke), ["data.val_fraction=0.02", "grid.alpha=search"]))
    by_on = {s.name: s.config for s in build_stages(on)}
    assert by_on["data"]["data"]["val_fraction"] == 0.02 and by_on["grid"]["grid"]["search_alphas"]
