"""The α search and the chain-density search on a local Ray (Tune), and best_alpha.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbd_ray.alpha_search import best_of
from cbd_ray.errors import CBDError
from cbd_ray.stages.grid_settings import apply_best_alpha, load_best_alpha
from cbd_ray.stages.tune import TuneSettings, _bracketing, density_subsets, run_alpha_search, run_density_search
from cbd_ray.tiny import builtin_text, save_tiny_model

from conftest import ROOT

SHAPE = {"layers": 3, "hidden": 48, "heads": 6, "ffn": 96}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune")
    text = builtin_text()
    (root / "train.txt").write_text(text[:30_000])
    (root / "heldout.txt").write_text(text[-6_000:])
    return {
        "root": root,
        "large": save_tiny_model(root / "large", "gpt2", tokenizer, seed=2, layers=4, hidden=64, heads=8, ffn=128),
        "mid": save_tiny_model(root / "mid", "gpt2", tokenizer, seed=4, layers=3, hidden=48, heads=6, ffn=96),
        "small": save_tiny_model(root / "small", "gpt2", tokenizer, seed=1, layers=2, hidden=32, heads=4, ffn=64),
    }


def _independent_loss(setup, alpha: float, tmp: Path) -> float:
    """The held-out loss of one α computed outside Tune, the same way a trial scores it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.finetune import encode_text, eval_windows, heldout_loss
    from cbd_ray.interpolate import AnchorPair, Shape

    d = tmp / f"a{alpha}"
    AnchorPair(setup["small"], setup["large"]).make(Shape(**SHAPE), d, alpha=alpha)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = encode_text(tok, (setup["root"] / "heldout.txt").read_text())
    return heldout_loss(model, eval_windows(ids, 32, 4))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_alpha_search_writes_the_argmin_alpha_and_resumes(ray_clean, setup, tmp_path):
    settings = TuneSettings(alphas=[0.0, 0.3, 0.7, 1.0], seq_len=32, eval_windows=4, densities=[2, 3])
    target = {"name": "t48", "small": str(setup["small"]), "large": str(setup["large"]), "shape": SHAPE}
    run = tmp_path / "run"
    best = run_alpha_search(run, [target], setup["root"] / "train.txt", setup["root"] / "heldout.txt", settings)
    rows = json.loads((run / "tune" / "alpha_results.json").read_text())
    assert sorted(r["alpha"] for r in rows) == [0.0, 0.3, 0.7, 1.0]
    assert all(r["status"] == "ok" and r["heldout_loss"] > 0 for r in rows)
    losses = {r["alpha"]: r["heldout_loss"] for r in rows}
    assert len(set(losses.values())) == 4  # every α made a different model
    argmin = min(losses, key=losses.get)
    assert best == {"t48": argmin}
    assert load_best_alpha(run) == {"t48": argmin}
    # The reported metric is the real held-out loss of that α's model.
    assert losses[0.3] == pytest.approx(_independent_loss(setup, 0.3, tmp_path), rel=1e-5)
    assert (run / "tune" / "alpha_sweep.png").stat().st_size > 1000
    assert not any((run / "tune" / "models" / "t48").glob("alpha-*/model.safetensors"))  # scratch models removed
    # A second call finds the finished experiment in <run>/tune and restores it instead of rerunning.
    logs: list[str] = []
    again = run_alpha_search(run, [target], setup["root"] / "train.txt", setup["root"] / "heldout.txt", settings,
                             log=logs.append)
    assert again == best and any("resuming" in line for line in logs)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_alpha_search_with_recovery_reports_every_eval_for_asha(ray_clean, setup, tmp_path):
    from cbd_ray.storage import atomic_write_json

    atomic_write_json(tmp_path / "tune" / "best_alpha.json", {"other": 0.4})  # an earlier search's target
    settings = TuneSettings(alphas=[0.0, 1.0], recovery_steps=4, eval_every=2, seq_len=32, eval_windows=4,
                            batch_size=2, scheduler="asha")
    target = {"name": "t48", "small": str(setup["small"]), "large": str(setup["large"]), "shape": SHAPE}
    best = run_alpha_search(tmp_path, [target], setup["root"] / "train.txt", setup["root"] / "heldout.txt", settings)
    rows = json.loads((tmp_path / "tune" / "alpha_results.json").read_text())
    finished = [r for r in rows if r["iterations"] == 3]  # reports at steps 0, 2, 4
    assert finished and all(r["step"] == 4 for r in finished)
    assert best["t48"] == min(finished, key=lambda r: r["heldout_loss"])["alpha"]
    assert load_best_alpha(tmp_path) == {"other": 0.4, "t48": best["t48"]}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_density_search_uses_the_bracketing_pair_of_each_subset(ray_clean, setup, tmp_path):
    chain = [("large", str(setup["large"])), ("mid", str(setup["mid"])), ("small", str(setup["small"]))]
    targets = [{"name": "t56", "shape": {"layers": 3, "hidden": 56, "heads": 7, "ffn": 112}}]
    settings = TuneSettings(densities=[2, 3], seq_len=32, eval_windows=4)
    rows = run_density_search(tmp_path, chain, targets, setup["root"] / "train.txt", setup["root"] / "heldout.txt",
                              settings)
    by = {(r["target"], r["density"]): r for r in rows}
    assert by[("t56", 2)]["pair"] == "large>small" and by[("t56", 3)]["pair"] == "large>mid"
    assert by[("t56", 2)]["heldout_loss"] != by[("t56", 3)]["heldout_loss"]
    # a smaller target is bracketed by the lower pair once the middle model is in the chain
    t40 = {"layers": 2, "hidden": 40, "heads": 5, "ffn": 80}
    assert _bracketing(chain, [0, 1, 2], t40, {}) == (1, 2) and _bracketing(chain, [0, 2], t40, {}) == (0, 2)
    assert all(r["status"] == "ok" and r["heldout_loss"] > 0 for r in rows)
    assert (tmp_path / "tune" / "density.md").read_text().count("|") > 10


def test_density_subsets_keep_both_ends():
    assert density_subsets(4, [2, 3, 4, 5]) == {2: [0, 3], 3: [0, 2, 3], 4: [0, 1, 2, 3]}
    assert density_subsets(3, [2, 3]) == {2: [0, 2], 3: [0, 1, 2]}


def test_best_of_ignores_trials_stopped_early():
    rows = [{"alpha": 0.0, "heldout_loss": 1.0, "iterations": 1, "status": "ok"},  # stopped by ASHA
            {"alpha": 0.5, "heldout_loss": 2.0, "iterations": 3, "status": "ok"},
            {"alpha": 1.0, "heldout_loss": 3.0, "iterations": 3, "status": "ok"},
            {"alpha": 0.2, "heldout_loss": None, "iterations": 0, "status": "error", "error": "x"}]
    assert best_of(rows)["alpha"] == 0.5
    with pytest.raises(CBDError, match="every trial failed"):
        best_of([rows[-1]])


def test_load_best_alpha_round_trip_and_apply(tmp_path):
    from cbd_ray.schema import load_config
    from cbd_ray.storage import atomic_write_json

    assert load_best_alpha(tmp_path) == {}
    atomic_write_json(tmp_path / "tune" / "best_alpha.json", {"t-3x48": 0.25, "t-2x64": 1.0})
    assert load_best_alpha(tmp_path) == {"t-3x48": 0.25, "t-2x64": 1.0}
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    new = apply_best_alpha(cfg, tmp_path)
    alphas = {t.label: t.alpha for t in new.grid.targets}
    assert alphas["t-3x48"] == 0.25 and alphas["t-2x64"] == 1.0 and alphas["t-2x32"] is None
    assert new.hash() != cfg.hash()
    atomic_write_json(tmp_path / "tune" / "best_alpha.json", {"t": 1.5})
    with pytest.raises(CBDError, match="α in"):
        load_best_alpha(tmp_path)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="outside"):
        TuneSettings(alphas=[0.5, 1.2])
    with pytest.raises(ValueError, match="at least 2"):
        TuneSettings(densities=[1, 2])
