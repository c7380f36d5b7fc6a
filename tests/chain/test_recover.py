"""``grid.recover``: each blended target is distilled from its larger anchor and replaces the
blend; a target whose larger model is the chain's source stays as blended, because CBD never
calls the source again; the settings are checked before any work."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cbd_ray.config import apply_overrides
from cbd_ray.errors import ConfigError
from cbd_ray.schema import parse_config

from conftest import ROOT



@pytest.fixture(scope="module")
def smoke() -> dict:
    return yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


def test_recover_settings_are_checked_before_any_work_and_leave_old_stage_hashes(smoke):
    from cbd_ray.stages.chain import build_stages

    with pytest.raises(ConfigError, match="grid.recover"):
        parse_config(apply_overrides(copy.deepcopy(smoke), ["grid.recover={steps: 0}"]))
    plain = {s.name: s.config for s in build_stages(parse_config(copy.deepcopy(smoke)))}
    assert "recover" not in plain["grid"]["grid"]  # configs without recovery keep their grid stage's hash
    rec = {s.name: s.config for s in build_stages(parse_config(apply_overrides(copy.deepcopy(smoke),
                                                                                ["grid.recover={steps: 2}"])))}
    assert rec["grid"]["grid"]["recover"] == {"steps": 2}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_blended_target_is_distilled_from_its_larger_anchor_never_the_source(ray_clean, smoke, tmp_path, tokenizer):
    from cbd_ray.baselines import init_cbd
    from cbd_ray.pipeline import StageContext
    from cbd_ray.stages.recover import FROM_SOURCE, recover_targets
    from cbd_ray.tiny import builtin_instructions, save_tiny_model

    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), [
        "grid.recover={steps: 1, checkpoint_every: 1, max_len: 32}"]))
    run = tmp_path / "run"
    data = run / "data"
    data.mkdir(parents=True)
    recs = builtin_instructions(12, seed=0)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:8]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[8:]))
    a1 = save_tiny_model(tmp_path / "a1", "gpt2", tokenizer, seed=1, layers=2, hidden=48, heads=3, ffn=192)
    a2 = save_tiny_model(tmp_path / "a2", "gpt2", tokenizer, seed=2, layers=1, hidden=32, heads=2, ffn=128)
    ctx = StageContext(name="grid", run_dir=run, out=run / "targets", work=run / "work" / "grid",
                       inputs={"data": data}, config={}, log=lambda s: None)
    init_cbd(a2, a1, {"layers": 2, "hidden": 32, "heads": 2, "ffn": 128}, ctx.out / "t-2x32", alpha=0.5)
    init_cbd(a1, a1, {"layers": 2, "hidden": 48, "heads": 3, "ffn": 192}, ctx.out / "t-top", alpha=0.5)
    before = load_file(ctx.out / "t-2x32" / "model.safetensors")
    records = [{"name": "t-2x32", "path": "t-2x32", "large": "a1", "small": "a2"},
               {"name": "t-top", "path": "t-top", "large": "source", "small": "a1"}]
    spent = recover_targets(ctx, cfg, records, {"a1": str(a1), "a2": str(a2)})
    after = load_file(ctx.out / "t-2x32" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the blend was trained further
    rec = records[0]["recovered"]
    assert rec["teacher"] == "a1" and rec["steps"] == 1 and rec["teacher_tokens"] > 0
    assert spent["teacher_tokens"] == rec["teacher_tokens"]
    assert json.loads((ctx.out / "t-2x32" / "baseline.json").read_text())["method"] == "cbd"  # provenance kept
    assert records[1]["recover_skipped"] == FROM_SOURCE and "recovered" not in records[1]


def test_the_chains_own_text_is_resolved_for_distillation_outside_a_chain_step():
    from cbd_ray.schema import with_chain_text

    assert with_chain_text({"lm_data": "text", "steps": 3}, "/run/data/text_train.txt") == {
        "lm_data": "/run/data/text_train.txt", "steps": 3}
    assert with_chain_text({"lm_data": "/corpus.txt"}, "/x")["lm_data"] == "/corpus.txt"
    assert "lm_data" not in with_chain_text({"steps": 3}, "/x")
