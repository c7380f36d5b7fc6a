"""The comparison run end to end at the tiny scale on a local Ray: every method's row in
report.md, convergence measured against Rand, a rerun reuses everything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cbd_ray.errors import ConfigError
from cbd_ray.reproduce import LABELS, add_convergence, load_reproduce_config, run_reproduce

ROOT = Path(__file__).resolve().parents[1]

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
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in LABELS for s in (0, 1)]
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
    for label in LABELS.values():
        assert f"| t-3x48 | {label} |" in report
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
