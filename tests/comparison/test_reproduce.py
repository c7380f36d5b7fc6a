"""The comparison run end to end at the tiny scale on a local Ray: every method's row in
report.md, convergence measured against Rand, a rerun reuses everything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cbd_ray.errors import ConfigError
from cbd_ray.reproduce import DEFAULT_METHODS, LABELS, add_convergence, load_reproduce_config, run_reproduce

from conftest import ROOT


TINY = {
    "run": {"name": "repro", "storage": "runs", "seed": 0},
    "chain": {
        "run": {"name": "chain"},
        "data": {"instructions": "builtin", "builtin_count": 40, "text": "builtin", "heldout_fraction": 0.02},
        "source": {"tiny": {"family": "gpt2", "shape": {"layers": 4, "hidden": 64, "heads": 8}, "max_positions": 64,
                            "tokenizer": {"vocab_size": 512, "text": "builtin"},
                            "pretrain": {"steps": 30, "batch_size": 4, "seq_len": 32, "lr": 3.0e-3,
                                         "checkpoint_every": 30}}},
        "distill": {"objective": "kd", "divergence": "fkl", "steps": 3, "batch_size": 4, "max_len": 32, "lr": 1.0e-3,
                    "checkpoint_every": 3},
        "anchors": [{"name": "a1", "shape": {"layers": 2, "hidden": 32, "heads": 4}}],
        "grid": {"alpha": "auto", "actors": 1,
                 "targets": [{"name": "t-3x48", "layers": 3, "hidden": 48, "heads": 6, "ffn": 192}]},
        "evaluation": {"heldout": True, "heldout_windows": 2, "max_length": 32},
        "scaling": {"workers": 1, "device": "cpu"},
    },
    "alpha": "best",
    "density": False,
    "tune": {"alphas": [0.0, 0.5, 1.0], "seq_len": 32, "eval_windows": 4},
    "finetune": {"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 3.0e-3, "eval_every": 3, "eval_windows": 4},
    "learngene": {"genes": 2},
}


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "repro.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_reproduce_tiny_writes_every_methods_row_and_reuses_on_rerun(ray_clean, tmp_path, monkeypatch):
    import cbd_ray.stages.tune as tune_mod

    searched: list[str] = []
    for fn in ("run_alpha_search", "run_density_search"):
        orig = getattr(tune_mod, fn)

        def spy(*a, _orig=orig, **kw):
            searched.append(str(a[-1]))  # the held-out text the search scores on
            return _orig(*a, **kw)
        monkeypatch.setattr(tune_mod, fn, spy)
    cfg, chain = load_reproduce_config(_write(tmp_path, {**TINY, "seeds": [0, 1]}))
    logs: list[str] = []
    res = run_reproduce(cfg, chain, storage=str(tmp_path / "runs"), log=logs.append, command="pytest")
    run = tmp_path / "runs" / "repro"
    assert res["run_dir"] == run
    # α is searched on the validation split only; the test split is disjoint from it
    data = run / "reproduce" / "data"
    assert searched == [str(data / "val.txt")]
    held = (run / "chain" / "data" / "text_heldout.txt").read_text()
    assert (data / "val.txt").read_text() + (data / "test.txt").read_text() == held
    rows = json.loads((run / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in DEFAULT_METHODS for s in (0, 1)]
    assert all(r["status"] == "ok" for r in rows), [r.get("status") for r in rows]
    by = {r["method"]: r for r in rows if r["seed"] == 0}
    assert by["cbd"]["from"] == "source>a1" and by["single"]["from"] == "a1 expanded"
    assert by["prune"]["from"] == "source pruned"
    assert by["auto_learngene"]["from"] == "source layers 0,1" and by["van_learngene"]["from"] == "source layers 2,3"
    assert by["direct_kd"]["teacher_tokens"] > 0
    assert len({r["params"] for r in rows}) == 1  # one target shape for every method
    for r in rows:
        assert [s for s, _ in r["eval_curve"]] == [0, 3, 6]
        assert 0 < r["final_loss"] < 10 and r["tokens"] == 6 * 4 * 32
    assert by["rand"]["final_loss"] < by["rand"]["initial_loss"]  # the budget trains a random init
    init = {m: round(r["initial_loss"], 6) for m, r in by.items()}
    assert len({v for m, v in init.items() if m != "prune"}) == 6  # six different initialisations
    # with the source as the large anchor, CBD at α = 0 is the source resized: Prune itself
    assert (init["cbd"] == init["prune"]) == (by["cbd"]["alpha"] == 0.0)
    rand1 = next(r for r in rows if r["method"] == "rand" and r["seed"] == 1)
    assert rand1["initial_loss"] != by["rand"]["initial_loss"]  # the seed reaches the random init
    # Convergence is measured against Rand's final loss of the same seed.
    assert by["rand"]["steps_to_rand"] == pytest.approx(6.0)
    assert by["cbd"]["delta_vs_rand"] == pytest.approx(by["cbd"]["final_loss"] - by["rand"]["final_loss"])
    summary = {r["method"]: r for r in json.loads((run / "summary.json").read_text())}
    cbd = [r["final_loss"] for r in rows if r["method"] == "cbd"]
    assert summary["cbd"]["final_loss_mean"] == pytest.approx(sum(cbd) / 2)
    assert summary["cbd"]["final_loss_std"] == pytest.approx(abs(cbd[0] - cbd[1]) / 2 ** 0.5)
    best = json.loads((run / "chain" / "tune" / "best_alpha.json").read_text())
    assert set(best) == {"t-3x48"} and by["cbd"]["alpha"] == best["t-3x48"]
    report = (run / "report.md").read_text()
    for m in DEFAULT_METHODS:
        assert f"| t-3x48 | {LABELS[m]} |" in report
    assert " ± " in report and "no search saw the test part" in report
    assert "Where CBD wins and where it loses" in report and "α sweep" in report
    for png in ("final_loss_by_size.png", "loss_curves_cbd_vs_rand.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert "(plots/loss_curves_cbd_vs_rand.png)" in report and "(chain/tune/alpha_sweep.png)" in report
    # A rerun reuses the chain, the search and every result.
    logs.clear()
    again = run_reproduce(cfg, chain, storage=str(tmp_path / "runs"), log=logs.append)
    assert sum("reusing its result" in line for line in logs) == 14
    assert [r["final_loss"] for r in again["rows"]] == [r["final_loss"] for r in rows]


def test_convergence_counts_steps_to_rands_final_loss():
    rows = [{"target": "t", "method": "rand", "status": "ok", "final_loss": 3.0,
             "eval_curve": [[0, 6.0], [10, 4.0], [20, 3.0]]},
            {"target": "t", "method": "cbd", "status": "ok", "final_loss": 2.0,
             "eval_curve": [[0, 4.0], [10, 3.0], [20, 2.0]]},
            {"target": "t", "method": "single", "status": "ok", "final_loss": 3.5,
             "eval_curve": [[0, 5.0], [10, 4.0], [20, 3.5]]}]
    add_convergence(rows)
    by = {r["method"]: r for r in rows}
    assert all(r["rand_final"] == 3.0 for r in rows)
    assert by["cbd"]["steps_to_rand"] == 10 and by["cbd"]["speedup"] == 2.0
    assert by["single"]["steps_to_rand"] is None and by["single"]["speedup"] is None
    assert by["single"]["delta_vs_rand"] == 0.5


def test_bad_configs_fail_before_any_work(tmp_path):
    bad = {**TINY, "methods": ["cbd", "magic"]}
    with pytest.raises(ConfigError, match="methods"):
        load_reproduce_config(_write(tmp_path, bad))
    with pytest.raises(ConfigError, match="not in the chain's grid"):
        load_reproduce_config(_write(tmp_path, {**TINY, "targets": ["t-9x9"]}))
    with pytest.raises(ConfigError, match="not found"):
        load_reproduce_config(_write(tmp_path, {**TINY, "chain": "nowhere.yaml"}))
    cfg, chain = load_reproduce_config(ROOT / "configs" / "reproduce_tiny.yaml")
    assert chain.run.name == "chain" and len(cfg.methods) == 7
    cfg, chain = load_reproduce_config(ROOT / "configs" / "reproduce_gpt2.yaml")
    assert chain.family == "gpt2" and [t.label for t in chain.grid.targets][0] == "gpt2-138M"
    cfg, chain = load_reproduce_config(ROOT / "configs" / "reproduce_wikitext_cpu.yaml")
    assert cfg.evaluation.tasks == ["arc_easy", "winogrande", "boolq"]


def test_the_paper_path_config_trains_the_family_apart_and_runs_every_baseline():
    """configs/reproduce_paperpath_cpu.yaml: anchors pre-trained from scratch and SFT'd, the
    pretraining term on the chain's own text, Rand pre-trained on three budgets."""
    from cbd_ray.reproduce import label_of
    from cbd_ray.stages.chain import stage_names

    cfg, chain = load_reproduce_config(ROOT / "configs" / "reproduce_paperpath_cpu.yaml")
    assert all(a.init == "pretrain" and a.sft is not None for a in chain.anchors) and chain.source.sft is not None
    assert chain.distill["lm_data"] == "text" and chain.distill["objective"] == "minillm"
    names = stage_names(chain)
    assert names.index("a1_pretrain") < names.index("a1_sft") < names.index("chain_1") < names.index("a2_pretrain")
    v = cfg.variants()
    assert v[v.index("rand"):v.index("single")] == ["rand", "rand_pt1x", "rand_pt4x", "rand_pt16x"]
    assert {"prune_kd", "cbd_recover"} <= set(v) and len(cfg.seeds) >= 3
    assert label_of("rand_pt16x") == "Rand + PT 16×" and label_of("prune_kd") == "Prune + KD"
    assert cfg.evaluation.tasks == ["dolly"] and cfg.finetune.second_domain.endswith("tinyshakespeare/input.txt")


def test_bad_paper_path_settings_fail_in_one_line(tmp_path):
    for extra, msg in (({"rand_pretrain": {"budgets": [1, 1]}}, "budgets"),
                       ({"rand_pretrain": {"budgets": [0]}}, "budgets"),
                       ({"finetune": {**TINY["finetune"], "second_domain": str(tmp_path / "nope.txt")}}, "second_domain"),
                       ({"methods": ["cbd_recover"], "recover": {"steps": 0}}, "steps"),
                       ({"rand_pretrain": {"targets": ["t-9x9"]}}, "rand_pretrain.targets")):
        with pytest.raises(ConfigError, match=msg):
            load_reproduce_config(_write(tmp_path, {**TINY, **extra}))


def _fake_chain(root: Path, stages: dict) -> Path:
    chain = root / "chain"
    chain.mkdir(parents=True)
    (chain / "manifest.json").write_text(json.dumps({"stages": {k: {"metrics": m} for k, m in stages.items()}}))
    return chain


def test_teacher_table_counts_the_chain_once_and_direct_distillation_per_target(tmp_path):
    from cbd_ray.reproduce import teacher_table

    _fake_chain(tmp_path, {"source": {"student_tokens": 9999, "teacher_tokens": 0},
                           "chain_1": {"teacher_tokens": 100}, "chain_2": {"teacher_tokens": 40}})
    summary = [{"target": t, "method": m, **extra} for t in ("t1", "t2")
               for m, extra in (("cbd", {}), ("cbd_recover", {"anchor_teacher_tokens_mean": 5.0}),
                                ("direct_kd", {"teacher_tokens_mean": 70.0}), ("prune_kd", {"teacher_tokens_mean": 60.0}))]
    table = teacher_table(tmp_path, summary, 2)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in table.splitlines()
            if line.startswith("| ") and "method" not in line}
    assert rows["CBD (the chain, shared by every target)"] == ["100", "40", "140"]
    assert rows["CBD + recovery"] == ["100", "50", "150"]
    assert rows["Direct KD (every target from the source)"] == ["140", "0", "140"]
    assert rows["Prune + KD (every target from the source)"] == ["120", "0", "120"]


def test_rand_pretrained_trains_on_its_multiple_of_the_chains_student_tokens(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from cbd_ray.finetune import text_loss
    from cbd_ray.reproduce import ReproduceConfig, chain_student_tokens, _init_rand_pt
    from cbd_ray.tiny import builtin_text, save_tiny_model

    chain = _fake_chain(tmp_path, {"source": {"student_tokens": 10 ** 6}, "chain_1": {"student_tokens": 1000},
                                   "chain_2": {"student_tokens": 500}})
    (chain / "data").mkdir()
    text = builtin_text()[:60000]
    (chain / "data" / "text_train.txt").write_text(text)
    source = save_tiny_model(tmp_path / "source", "gpt2", tokenizer, seed=0, layers=2, hidden=32, heads=4, ffn=64)
    assert chain_student_tokens(chain) == 1500
    cfg = ReproduceConfig.model_validate({**TINY, "rand_pretrain": {"budgets": [0.5, 2], "batch_size": 4,
                                                                     "seq_len": 16, "warmup": 5}})
    t = {"name": "t", "shape": {"layers": 2, "hidden": 32, "heads": 4, "ffn": 64}}
    out = tmp_path / "t" / "rand_pt2x" / "seed-0" / "init"
    info = _init_rand_pt("rand_pt2x", t, str(source), out, cfg, chain, seed=0, log=lambda s: None)
    assert info["pretrain_tokens"] == 47 * 4 * 16  # ceil(2 x 1500 / 64) steps of 4 x 16 tokens
    half = tmp_path / "t" / "rand_pt0.5x" / "seed-0" / "init"
    logs: list[str] = []
    info = _init_rand_pt("rand_pt0.5x", t, str(source), half, cfg, chain, seed=0, log=logs.append)
    assert info["pretrain_tokens"] == 12 * 4 * 16 and logs == []  # the snapshot of the same run, not a new one
    start = tmp_path / "rand"
    from cbd_ray.baselines import init_rand

    init_rand(source, t["shape"], start, seed=0)
    loss = {d: text_loss(AutoModelForCausalLM.from_pretrained(d).eval(), tokenizer, text[-5000:], 16, 8)
            for d in (start, out)}
    assert loss[out] < loss[start] - 0.5  # the budget trains the random init


def test_recovery_leaves_a_target_below_the_source_as_blended(tmp_path, tokenizer):
    """CBD never calls the source again: a target whose larger model is the source is not
    recovered (its row says so and spends no teacher tokens)."""
    from cbd_ray.interpolate import ResizeOptions
    from cbd_ray.reproduce import ReproduceConfig, _init_recover
    from cbd_ray.tiny import save_tiny_model

    src = save_tiny_model(tmp_path / "source", "gpt2", tokenizer, seed=0, layers=4, hidden=64, heads=8, ffn=128)
    a1 = save_tiny_model(tmp_path / "a1", "gpt2", tokenizer, seed=1, layers=2, hidden=32, heads=4, ffn=64)
    cfg = ReproduceConfig.model_validate(TINY)
    t = {"name": "t", "shape": {"layers": 3, "hidden": 48, "heads": 6, "ffn": 96}, "small": str(a1), "large": str(src),
         "pair": "source>a1", "resize": ResizeOptions()}
    out = tmp_path / "cbd_recover" / "init"
    info = _init_recover(t, str(src), out, cfg, None, tmp_path, 0.5, 0, lambda s: None)
    assert info["anchor_teacher_tokens"] == 0 and "not recovered" in info["from"] and info["alpha"] == 0.5
    assert json.loads((out / "baseline.json").read_text())["method"] == "cbd"


def test_a_constant_rate_pretraining_snapshot_is_the_shorter_run(tmp_path, tokenizer):
    """With a fixed warm-up and a constant rate after it, the model saved at step k of a long
    run is the k-step run: Rand's smaller budgets are snapshots of its largest."""
    from safetensors.torch import load_file

    from cbd_ray.stages.models import pretrain_lm
    from cbd_ray.tiny import builtin_text, save_tiny_model

    init = save_tiny_model(tmp_path / "init", "gpt2", tokenizer, seed=0, layers=1, hidden=32, heads=4, ffn=64)
    text = builtin_text()[:20000]
    common = dict(batch_size=2, seq_len=16, lr=1e-2, checkpoint_every=100, seed=1, log=lambda s: None, warmup=3)
    pretrain_lm(str(init), text, str(tmp_path / "long"), str(tmp_path / "w1"), 8,
                snapshots={4: str(tmp_path / "snap4")}, **common)
    pretrain_lm(str(init), text, str(tmp_path / "short"), str(tmp_path / "w2"), 4, **common)
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in ("snap4", "short", "long"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
