"""The chain config: unknown keys and impossible settings fail with the key's dotted path
and what is allowed; dotted overrides reach nested keys and list items. The typed-config
machinery under it (cbd_ray.config) is pinned first, on a config of its own."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cbd_ray import config
from cbd_ray.config import apply_overrides, config_hash
from cbd_ray.errors import ConfigError
from cbd_ray.schema import load_config, parse_config

from conftest import ROOT



# ------------------------------------------------------------------ cbd_ray.config

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


# ------------------------------------------------------------------ the chain config


@pytest.fixture(scope="module")
def smoke() -> dict:
    return yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


def bad(data: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(apply_overrides(copy.deepcopy(data), list(overrides)), source="cfg")
    return str(exc.value)


def test_smoke_parses_and_overrides_reach_nested_keys_and_list_items(smoke):
    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), [
        "distill.steps=7", "anchors.1.distill.lr=0.5", "grid.targets.0.alpha=0.25", "run.name=other",
        "scaling.workers=2",
    ]))
    assert cfg.distill["steps"] == 7 and cfg.run.name == "other"
    assert cfg.grid.targets[0].alpha == 0.25
    # per-step settings: scaling, then shared defaults, then the anchor's own
    s0, s1 = cfg.step_distill(0), cfg.step_distill(1)
    assert s0["lr"] == smoke["distill"]["lr"] and s1["lr"] == 0.5
    assert s0["steps"] == s1["steps"] == 7 and s0["workers"] == 2


def test_unknown_keys_name_their_path(smoke):
    msg = bad(smoke, "grid.targetz=1")
    assert "grid.targetz: unknown key" in msg
    msg = bad(smoke, "source.tiny.shape.widht=3")
    assert "source.tiny.shape.widht: unknown key" in msg
    msg = bad(smoke, "evaluation.heldout_windows=0")
    assert "evaluation.heldout_windows" in msg and "greater than 0" in msg


def test_literal_choices_say_what_is_allowed(smoke):
    msg = bad(smoke, "scaling.device=tpu")
    assert "scaling.device" in msg and "'cpu'" in msg and "'npu'" in msg and "tpu" in msg
    msg = bad(smoke, "source.tiny.family=bert")
    assert "source.tiny.family" in msg and "gpt_neox" in msg


def test_bridge_without_teacher_fails(smoke):
    data = copy.deepcopy(smoke)
    data["bridge"] = {"generation": {"max_new_tokens": 8}}
    assert "bridge.teacher: Field required" in bad(data)


def test_anchors_must_descend_in_size(smoke):
    msg = bad(smoke, "anchors.1.shape={layers: 4, hidden: 96, heads: 6}")
    assert "anchors.1" in msg and "descending size" in msg and "'a1'" in msg


def test_target_outside_every_pair_names_the_pairs(smoke):
    msg = bad(smoke, "grid.targets.0.layers=9")
    assert "grid.targets.0" in msg and "outside every adjacent anchor pair" in msg
    assert "source 3x64x4 > a1 2x48x3" in msg


def test_target_must_keep_head_dim(smoke):
    msg = bad(smoke, "grid.targets.0.heads=4", "grid.targets.0.hidden=48")
    assert "grid.targets.0" in msg and "head_dim 16" in msg and "heads=3" in msg


def test_impossible_values(smoke):
    assert "grid.targets.1.alpha" in bad(smoke, "grid.targets.1.alpha=1.5")
    assert "anchors.0.shape" in bad(smoke, "anchors.0.shape.heads=5")  # 5 does not divide 48
    assert "grid.actors" in bad(smoke, "grid.actors=0")
    assert "anchors.1.name" in bad(smoke, "anchors.1.name=a1")
    assert "scaling.deepspeed" in bad(smoke, "scaling.deepspeed=4")
    assert "grid.resize" in bad(smoke, "grid.resize.width_subset=importance")


def test_source_is_a_checkpoint_or_tiny_not_both(smoke):
    msg = bad(smoke, "source.model=openai-community/gpt2")
    assert "source" in msg and "exactly one of `model`" in msg


def test_several_problems_are_reported_together(smoke):
    msg = bad(smoke, "grid.actors=0", "scaling.device=tpu", "nonsense=1")
    assert all(k in msg for k in ("grid.actors", "scaling.device", "nonsense: unknown key"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="must be an integer index"):
        apply_overrides({"anchors": [{}]}, ["anchors.first.name=x"])


def test_distill_settings_checked_by_the_engine_with_the_right_path(smoke):
    pytest.importorskip("cbd_ray.train")
    msg = bad(smoke, "distill.objective=magic")
    assert "distill.objective" in msg and "minillm" in msg
    msg = bad(smoke, "anchors.1.distill.objective=magic")
    assert "anchors.1.distill.objective" in msg
    msg = bad(smoke, "anchors.0.distill.stepz=3")
    assert "anchors.0.distill.stepz: unknown key" in msg
    # a rule over several settings is reported at the first one its message names
    msg = bad(smoke, "distill.batch_size=3", "scaling.workers=2")
    assert "distill.batch_size" in msg and "multiple of workers 2" in msg


def test_anchor_sft_adds_its_stage_before_the_chain_step_and_is_validated(smoke):
    """The paper SFTs the anchors on Dolly first: ``anchors.0.sft`` adds stage a1_sft (as
    ``source.sft`` adds source_sft), whose model is chain_1's student; a public checkpoint's
    SFT reads only the instructions. Stages of configs without it keep their hashes."""
    from cbd_ray.stages.chain import build_stages

    plain = {s.name: s for s in build_stages(parse_config(copy.deepcopy(smoke)))}
    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), ["anchors.0.sft.distill.steps=2"]))
    stages = {s.name: s for s in build_stages(cfg)}
    names = list(stages)
    assert names.index("source") < names.index("a1_sft") < names.index("chain_1") and "a2_sft" not in names
    assert set(names) - set(plain) == {"a1_sft"}
    sft, step = stages["a1_sft"], stages["chain_1"]
    assert sft.config["distill"]["objective"] == "sft" and sft.config["distill"]["steps"] == 2
    assert sft.output == "models/a1_sft" and sft.teacher is None
    assert list(sft.inputs) == ["source", "data"]  # the pruned start is cut from the source
    assert list(step.inputs) == ["source", "a1_sft", "data"] and step.output == "models/a1" and step.teacher == "source"
    assert step.config == plain["chain_1"].config and stages["chain_2"].config == plain["chain_2"].config
    ckpt = parse_config(apply_overrides(copy.deepcopy(smoke), [
        "anchors.0.model=/some/ckpt", "anchors.0.shape=null", "anchors.0.sft.enabled=true"]))
    assert list({s.name: s for s in build_stages(ckpt)}["a1_sft"].inputs) == ["data"]
    off = parse_config(apply_overrides(copy.deepcopy(smoke), ["anchors.0.sft.enabled=false"]))
    assert "a1_sft" not in [s.name for s in build_stages(off)]
    assert "anchors.0.sft.distill.stepz: unknown key" in bad(smoke, "anchors.0.sft.distill.stepz=3")
    assert "anchors.1.sft.distill.lr: Input should be greater than 0" in bad(smoke, "anchors.1.sft.distill.lr=-1")


def test_load_config_reads_yaml_and_applies_overrides(tmp_path, smoke):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(smoke))
    a = load_config(p)
    b = load_config(p, ["distill.steps=5"])
    assert a.hash() != b.hash() and config_hash({"x": 1}) == config_hash({"x": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_grid_alpha_best_takes_the_searched_alpha_and_auto_for_the_rest(smoke, tmp_path):
    import json

    from cbd_ray.stages.grid_settings import with_searched_alpha

    assert "alpha" in bad(smoke, "grid.alpha=bestest")
    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), ["grid.alpha=best", "grid.targets.1.alpha=0.9"]))
    run = tmp_path / "run"
    # no search yet: every target uses auto
    none = with_searched_alpha(cfg, run, log=lambda m: None)
    assert none.grid.alpha == "auto" and [t.alpha for t in none.grid.targets] == [None, 0.9, None, None]
    (run / "tune").mkdir(parents=True)
    (run / "tune" / "best_alpha.json").write_text(json.dumps({"t-3x48": 0.25, "t-2x64": 0.5}))
    got = with_searched_alpha(cfg, run, log=lambda m: None)
    # searched α fills targets without their own; an explicit α in the config wins
    assert got.grid.alpha == "auto" and [t.alpha for t in got.grid.targets] == [0.25, 0.9, None, None]
