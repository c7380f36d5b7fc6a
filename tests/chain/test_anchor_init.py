"""Anchor initialisation (``anchors[i].init``): a pruned anchor starts as its parent cut to
its shape, so its weights are an exact subset of the parent's before any distillation."""
from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
import yaml

from cbd_ray.config import apply_overrides
from cbd_ray.errors import ConfigError
from cbd_ray.schema import parse_config
from cbd_ray.stages.chain import start_anchor
from tests.anchor_models import weights

from conftest import ROOT



@pytest.fixture(scope="module")
def smoke() -> dict:
    return yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())


def test_default_init_is_prune_without_a_checkpoint_and_checkpoint_with_one(smoke):
    cfg = parse_config(copy.deepcopy(smoke))
    assert all(a.init == "prune" for a in cfg.anchors)
    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), ["anchors.0.model=/some/ckpt", "anchors.0.shape=null"]))
    assert cfg.anchors[0].init == "checkpoint"
    for ov, msg in ((["anchors.0.init=checkpoint"], "needs `model`"),
                    (["anchors.0.init=grow"], "anchors.0.init"),
                    (["anchors.0.model=/x", "anchors.0.init=random"], "does not use `model`")):
        with pytest.raises(ConfigError, match=msg):
            parse_config(apply_overrides(copy.deepcopy(smoke), ov))


def _column_index(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """For each column of ``small`` the index of the identical column of ``big`` (exact)."""
    out = []
    for j in range(small.shape[1]):
        hits = [i for i in range(big.shape[1]) if torch.equal(big[:, i], small[:, j])]
        assert len(hits) == 1, f"column {j} matches {len(hits)} parent columns"
        out.append(hits[0])
    return out


def test_pruned_anchor_is_an_exact_subset_of_its_parent(tmp_path, tokenizer):
    from cbd_ray.tiny import builtin_instructions, save_tiny_model

    parent = save_tiny_model(tmp_path / "parent", "gpt2", tokenizer, seed=3, layers=4, hidden=64, heads=8, ffn=256)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in builtin_instructions(16, seed=0)))
    ctx = types.SimpleNamespace(work=tmp_path / "work", inputs={"data": data}, name="chain_1", log=lambda s: None)
    cfg = types.SimpleNamespace(family="gpt2")
    init = {"init": "prune", "model": None, "shape": {"layers": 2, "hidden": 32, "heads": 4}, "seed": 0}
    start, info = start_anchor(cfg, init, str(parent), ctx)
    assert info["init"] == "prune" and info["init_from"] == "parent"
    assert info["init_resize"]["width_subset"] == "importance" and info["init_resize"]["calib"]["texts"] == 16
    P, C = weights(parent), weights(Path(start))
    h = _column_index(C["transformer.wte.weight"], P["transformer.wte.weight"])
    assert h == sorted(h) and len(h) == 32  # channel order kept
    assert torch.equal(C["transformer.wpe.weight"], P["transformer.wpe.weight"][:, h])
    assert torch.equal(C["transformer.ln_f.weight"], P["transformer.ln_f.weight"][h])
    kept = []
    for j in range(2):
        c = f"transformer.h.{j}."
        # the parent layer this one came from: the one whose ln_1 matches on the kept channels
        src = [i for i in range(4) if torch.equal(P[f"transformer.h.{i}.ln_1.weight"][h], C[c + "ln_1.weight"])]
        assert len(src) == 1
        p = f"transformer.h.{src[0]}."
        kept.append(src[0])
        f = _column_index(C[c + "mlp.c_fc.weight"], P[p + "mlp.c_fc.weight"][h])
        assert len(f) == 128
        assert torch.equal(C[c + "mlp.c_fc.bias"], P[p + "mlp.c_fc.bias"][f])
        assert torch.equal(C[c + "mlp.c_proj.weight"], P[p + "mlp.c_proj.weight"][f][:, h])
        q = _column_index(C[c + "attn.c_attn.weight"], P[p + "attn.c_attn.weight"][h])
        assert torch.equal(C[c + "attn.c_attn.bias"], P[p + "attn.c_attn.bias"][q])
        assert torch.equal(C[c + "attn.c_proj.weight"], P[p + "attn.c_proj.weight"][q[:32]][:, h])
    assert kept == sorted(kept)
    # a second call reuses the started model (a resumed stage does not prune again)
    mtime = (Path(start) / "model.safetensors").stat().st_mtime_ns
    assert start_anchor(cfg, init, str(parent), ctx)[0] == start
    assert (Path(start) / "model.safetensors").stat().st_mtime_ns == mtime


def test_an_sft_anchor_is_its_start_sft_then_distilled_and_keeps_its_lineage(smoke, tmp_path, tokenizer, monkeypatch):
    """``anchors[0].sft``: stage a1_sft fine-tunes the anchor's start (the source pruned to its
    shape) with objective sft and no teacher; chain_1 then distils that SFT'd model from the
    source, and still records that it descends from the source (for aligned blending)."""
    import shutil

    from cbd_ray.align import descends_from
    from cbd_ray.pipeline import StageContext
    from cbd_ray.stages.chain import build_stages
    from cbd_ray.storage import materialize
    from cbd_ray.tiny import builtin_instructions, save_tiny_model

    calls = []

    def fake_run_distill(teacher, student, data, out, cfg, **kw):  # the Ray Train run: the student unchanged
        calls.append({"teacher": teacher, "student": str(materialize(student)), "objective": cfg.objective,
                      "steps": cfg.steps})
        shutil.copytree(materialize(student), out, ignore=shutil.ignore_patterns("lineage.json"))
        return {"step": cfg.steps, "student_tokens": 1, "teacher_tokens": 0}

    monkeypatch.setattr("cbd_ray.train.run_distill", fake_run_distill)
    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), ["anchors.0.sft.distill.steps=2"]))
    stages = {s.name: s for s in build_stages(cfg)}
    run = tmp_path / "run"
    source = save_tiny_model(run / "models" / "source", "gpt2", tokenizer, seed=0, layers=3, hidden=64, heads=4,
                             max_positions=128)
    data = run / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in builtin_instructions(8, seed=0)))
    (data / "eval.jsonl").write_text((data / "train.jsonl").read_text())
    outs = {"source": source, "data": data}
    for name in ("a1_sft", "chain_1"):
        st = stages[name]
        ctx = StageContext(name=name, run_dir=run, out=run / st.out_rel, work=run / "work" / name,
                           inputs={i: outs[i] for i in st.inputs}, config=st.config, log=lambda s: None)
        ctx.work.mkdir(parents=True)
        metrics = st.fn(ctx)
        outs[name] = ctx.out
    assert [(c["objective"], c["steps"]) for c in calls] == [("sft", 2), ("kd", 4)]
    assert Path(calls[0]["student"]) == run / "work" / "a1_sft" / "init"  # the pruned start, SFT'd
    assert Path(calls[1]["student"]) == run / "models" / "a1_sft"
    assert calls[1]["teacher"]["uri"].endswith("models/source")
    assert descends_from(outs["a1_sft"], source) and descends_from(outs["chain_1"], source)
    assert metrics["step"] == 4 and "init" not in metrics  # chain_1 starts from the SFT stage's model


def test_baselines_stage_scores_prune_per_target_and_the_report_shows_it(smoke, tmp_path, tokenizer):
    """The chain's baselines stage (here Prune only: Direct KD needs Ray Train) scores the
    source cut to every target on the held-out text; the report table and the teacher-cost
    table read it (Direct KD measured when it ran, else labelled an estimate)."""
    from cbd_ray.manifest import Manifest
    from cbd_ray.stages.baselines import baselines_stage
    from cbd_ray.stages.chain import build_stages
    from cbd_ray.stages.summary import _with_baselines, cost_rows
    from cbd_ray.tiny import builtin_instructions, builtin_text, save_tiny_model

    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), ["evaluation.baselines=[prune]"]))
    assert "baselines" in [s.name for s in build_stages(cfg)]
    assert "baselines" not in [s.name for s in build_stages(parse_config(copy.deepcopy(smoke)))]
    src = save_tiny_model(tmp_path / "source", "gpt2", tokenizer, seed=0, layers=4, hidden=64, heads=4, ffn=256)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in builtin_instructions(8, seed=0)))
    (data / "text_heldout.txt").write_text(builtin_text()[:20000])
    ctx = types.SimpleNamespace(work=tmp_path / "work", out=tmp_path / "baselines", inputs={"data": data, "source": src},
                                name="baselines", log=lambda s: None)
    metrics = baselines_stage(cfg, "source")(ctx)
    rows = json.loads((tmp_path / "baselines" / "baselines.json").read_text())
    assert [r["target"] for r in rows] == [t.label for t in cfg.grid.targets] and metrics["teacher_tokens"] == 0
    assert all(r["method"] == "prune" and 0 < r["heldout_nll"] < 20 for r in rows)
    ev = _with_baselines([{"model": "t-3x48", "kind": "target"}, {"model": "a1", "kind": "anchor"}], rows)
    assert ev[0]["prune_nll"] == rows[0]["heldout_nll"] and "prune_nll" not in ev[1]
    man = Manifest(tmp_path / "run", {"stages": {"chain_1": {"status": "done", "teacher_tokens": 100},
                                                 "baselines": {"status": "done", "metrics": {}}}})
    assert "estimate" in cost_rows(man, n_targets=4)[-1]["stage"]
    man.stages["baselines"]["metrics"]["direct_kd_teacher_tokens"] = 999
    rows = cost_rows(man, n_targets=4)
    assert rows[-1]["teacher_tokens"] == 999 and "measured" in rows[-1]["stage"]
    assert rows[-2]["teacher_tokens"] == 100  # the baselines' spend is not the chain's


def test_prune_with_calibration_longer_than_the_models_positions(tmp_path, tokenizer):
    """Calibration blocks (128 tokens) longer than a model's learned positions are cut to fit."""
    from cbd_ray.tiny import builtin_instructions, save_tiny_model

    parent = save_tiny_model(tmp_path / "parent", "gpt2", tokenizer, seed=3, layers=2, hidden=32, heads=4, ffn=64,
                             max_positions=32)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in builtin_instructions(8, seed=0)))
    ctx = types.SimpleNamespace(work=tmp_path / "work", inputs={"data": data}, name="chain_1", log=lambda s: None)
    start, info = start_anchor(types.SimpleNamespace(family="gpt2"), {"init": "prune", "shape": {
        "layers": 1, "hidden": 16, "heads": 2}, "seed": 0}, str(parent), ctx)
    assert info["init"] == "prune" and (Path(start) / "model.safetensors").is_file()


def test_a_pretrain_anchor_starts_at_random_and_learns_the_chains_text(smoke, tmp_path, tokenizer):
    """``init: pretrain``: the anchor's own stage makes a random model of its shape with the
    source's vocabulary and pre-trains it on the data stage's text (a family trained apart)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from cbd_ray.pipeline import StageContext
    from cbd_ray.stages.chain import anchor_pretrain_stage
    from cbd_ray.tiny import builtin_text, save_tiny_model

    cfg = parse_config(apply_overrides(copy.deepcopy(smoke), [
        "anchors.0.init=pretrain", "anchors.0.pretrain={steps: 3, batch_size: 2, seq_len: 16, checkpoint_every: 3}"]))
    with pytest.raises(ConfigError, match="init: pretrain only"):
        parse_config(apply_overrides(copy.deepcopy(smoke), ["anchors.0.pretrain={steps: 3}"]))
    source = save_tiny_model(tmp_path / "source", "gpt2", tokenizer, seed=0, layers=3, hidden=64, heads=4, ffn=256)
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / "text_train.txt").write_text(builtin_text()[:20000])
    ctx = StageContext(name="a1_pretrain", run_dir=tmp_path / "run", out=tmp_path / "run" / "models" / "a1_pretrain",
                       work=tmp_path / "run" / "work" / "a1_pretrain", inputs={"source": source, "data": data},
                       config={}, log=lambda s: None)
    m = anchor_pretrain_stage(cfg, cfg.anchors[0], "source")(ctx)
    assert m["init"] == "pretrain" and m["student_tokens"] == 3 * 2 * 16
    c = AutoConfig.from_pretrained(ctx.out)
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size) == (2, 48, 3, len(tokenizer))
    start, done = load_file(ctx.work / "init" / "model.safetensors"), load_file(ctx.out / "model.safetensors")
    assert any(not torch.equal(start[k], done[k]) for k in start)  # trained, not the random start
