"""Every baseline initialisation gives a loadable model of the target shape; Learngene
variants copy exactly the source layers they name; the fine-tune loop and the
steps-to-same-loss measure behave."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbd_ray.baselines import (init_auto_learngene, init_cbd, init_learngene, init_prune, init_rand, init_single,
                               init_van_learngene, learngene_layers)
from cbd_ray.errors import CBDError
from cbd_ray.finetune import finetune_lm, steps_to_reach
from cbd_ray.interpolate import Shape
from cbd_ray.tiny import builtin_text, save_tiny_model

TARGET = Shape(layers=3, hidden=48, heads=6, ffn=96)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baselines")
    return {
        "source": save_tiny_model(root / "source", "gpt2", tokenizer, seed=3, layers=5, hidden=64, heads=8, ffn=128),
        "large": save_tiny_model(root / "large", "gpt2", tokenizer, seed=2, layers=4, hidden=64, heads=8, ffn=128),
        "small": save_tiny_model(root / "small", "gpt2", tokenizer, seed=1, layers=2, hidden=32, heads=4, ffn=64),
    }


def _config_shape(d: Path) -> tuple[int, int, int, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(d)
    return c.n_layer, c.n_embd, c.n_head, c.n_inner


def _loads_and_runs(d: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits


def test_every_method_gives_a_loadable_model_of_the_target_shape(models, tmp_path):
    outs = {
        "cbd": init_cbd(models["small"], models["large"], TARGET, tmp_path / "cbd", alpha=0.5),
        "rand": init_rand(models["source"], TARGET, tmp_path / "rand", seed=0),
        "single": init_single(models["small"], TARGET, tmp_path / "single"),
        "prune": init_prune(models["source"], TARGET, tmp_path / "prune"),
        "auto": init_auto_learngene(models["source"], TARGET, tmp_path / "auto", genes=2),
        "van": init_van_learngene(models["source"], TARGET, tmp_path / "van", genes=2),
    }
    for name, d in outs.items():
        assert _config_shape(d) == (3, 48, 6, 96), name
        logits = _loads_and_runs(d)
        assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all(), name
        assert (d / "baseline.json").is_file()
    # Different inits really differ (none silently reuses another).
    w = {k: load_file(str(v / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"] for k, v in outs.items()}
    assert not torch.equal(w["cbd"], w["single"]) and not torch.equal(w["rand"], w["auto"])


def test_prune_is_the_source_cut_by_the_subset_rules(models, tmp_path):
    from cbd_ray.interpolate import resize_model

    d = init_prune(models["source"], TARGET, tmp_path / "p")
    resize_model(models["source"], TARGET, tmp_path / "r")
    a, b = load_file(str(d / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src = load_file(str(models["source"] / "model.safetensors"))
    assert a["transformer.wte.weight"].shape == (512, 48) and src["transformer.wte.weight"].shape == (512, 64)


def test_single_is_the_small_anchor_expanded_alone(models, tmp_path):
    single = load_file(str(init_single(models["small"], TARGET, tmp_path / "s") / "model.safetensors"))
    alpha1 = load_file(str(init_cbd(models["small"], models["large"], TARGET, tmp_path / "c", alpha=1.0)
                           / "model.safetensors"))
    assert single.keys() == alpha1.keys()
    for k in single:  # no blending: exactly the α = 1 end of the interpolation
        assert torch.equal(single[k], alpha1[k]), k


def test_rand_is_seeded(models, tmp_path):
    a = load_file(str(init_rand(models["source"], TARGET, tmp_path / "a", seed=5) / "model.safetensors"))
    b = load_file(str(init_rand(models["source"], TARGET, tmp_path / "b", seed=5) / "model.safetensors"))
    c = load_file(str(init_rand(models["source"], TARGET, tmp_path / "c", seed=6) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], c["transformer.h.0.mlp.c_fc.weight"])


def test_learngene_copies_the_first_or_last_source_layers(models, tmp_path):
    # Same width as the source: width resizing is the identity, so copied tensors equal the source's.
    shape = Shape(layers=4, hidden=64, heads=8, ffn=128)
    src = load_file(str(models["source"] / "model.safetensors"))
    rand = load_file(str(init_rand(models["source"], shape, tmp_path / "r", seed=0) / "model.safetensors"))
    auto = load_file(str(init_auto_learngene(models["source"], shape, tmp_path / "auto", genes=3) / "model.safetensors"))
    van = load_file(str(init_van_learngene(models["source"], shape, tmp_path / "van", genes=3) / "model.safetensors"))
    per_layer = [k[len("transformer.h.0."):] for k in src if k.startswith("transformer.h.0.")]
    assert per_layer
    for suffix in per_layer:
        for j in range(3):  # auto: source layers 0, 1, 2 -> target layers 0, 1, 2
            assert torch.equal(auto[f"transformer.h.{j}.{suffix}"], src[f"transformer.h.{j}.{suffix}"])
        # the remaining layer is the random initialisation (same seed as Rand)
        assert torch.equal(auto[f"transformer.h.3.{suffix}"], rand[f"transformer.h.3.{suffix}"])
        for j, s in ((1, 2), (2, 3), (3, 4)):  # van: source layers 2, 3, 4 -> target layers 1, 2, 3
            assert torch.equal(van[f"transformer.h.{j}.{suffix}"], src[f"transformer.h.{s}.{suffix}"])
        assert torch.equal(van[f"transformer.h.0.{suffix}"], rand[f"transformer.h.0.{suffix}"])
    assert torch.equal(auto["transformer.wte.weight"], src["transformer.wte.weight"])


def test_learngene_resizes_source_width_to_the_target(models, tmp_path):
    d = init_auto_learngene(models["source"], TARGET, tmp_path / "a", genes=3)
    w = load_file(str(d / "model.safetensors"))
    assert w["transformer.h.0.mlp.c_fc.weight"].shape == (48, 96)
    assert learngene_layers("van", 5, 3, 3) == {0: 2, 1: 3, 2: 4}
    assert learngene_layers("auto", 2, 4, 3) == {0: 0, 1: 1}
    with pytest.raises(CBDError, match="variant 'mid' unknown"):
        init_learngene(models["source"], TARGET, tmp_path / "x", variant="mid")


def test_existing_output_is_not_overwritten(models, tmp_path):
    d = init_rand(models["source"], TARGET, tmp_path / "r")
    with pytest.raises(FileExistsError, match="overwrite"):
        init_rand(models["source"], TARGET, d)
    init_rand(models["source"], TARGET, d, overwrite=True, seed=1)


def test_finetune_lowers_heldout_loss_and_steps_to_reach(models):
    text = builtin_text()
    torch.manual_seed(0)
    r = finetune_lm(models["small"], text[:40_000], text[-8_000:], steps=12, batch_size=4, seq_len=32, lr=3e-3,
                    eval_every=4, eval_windows_n=4, seed=0)
    steps = [s for s, _ in r["eval_curve"]]
    assert steps == [0, 4, 8, 12]
    assert r["final_eval"] < r["initial_eval"]
    assert len(r["train_curve"]) == 12
    curve = [[0, 5.0], [10, 4.0], [20, 3.0]]
    assert steps_to_reach(curve, 4.0) == 10.0
    assert steps_to_reach(curve, 3.5) == 15.0  # linear between the measured points
    assert steps_to_reach(curve, 2.0) is None


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_prune_kd_and_recovery_distill_their_own_starts(ray_clean, models, tmp_path):
    """Prune + KD starts from the pruned source and Recovery from the blend, and each is then
    trained by the distillation engine (teacher tokens spent, weights moved off the start)."""
    import json

    from cbd_ray.baselines import init_prune_kd, recover
    from cbd_ray.tiny import builtin_instructions

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_instructions(16, seed=0)))
    kd = {"objective": "kd", "divergence": "fkl", "steps": 1, "batch_size": 4, "max_len": 32, "lr": 1e-2,
          "workers": 1, "device": "cpu", "checkpoint_every": 1}
    pruned = init_prune(models["source"], TARGET, tmp_path / "prune")
    pkd = init_prune_kd(models["source"], TARGET, tmp_path / "prune_kd", data, kd, seed=0)
    info = json.loads((pkd / "baseline.json").read_text())
    assert info["method"] == "prune_kd" and info["metrics"]["teacher_tokens"] > 0
    assert _config_shape(pkd) == _config_shape(pruned)
    a, b = load_file(pruned / "model.safetensors"), load_file(pkd / "model.safetensors")
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)
    blend = init_cbd(models["small"], models["large"], TARGET, tmp_path / "blend", alpha=0.5)
    rec = recover(blend, models["large"], tmp_path / "recovered", data, kd, seed=0)
    info = json.loads((rec / "baseline.json").read_text())
    assert info["method"] == "recover" and info["blend"]["method"] == "cbd" and info["blend"]["alpha"] == 0.5
    assert info["teacher"] == str(models["large"]) and info["metrics"]["teacher_tokens"] > 0
    a, b = load_file(blend / "model.safetensors"), load_file(rec / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_rerun_replaces_its_own_cbd_init_after_a_cut(models, tmp_path):
    """A comparison cut between a method's init and its result re-initialises the same
    directory: the baseline.json cbd-ray wrote there is its own file, not a stranger's."""
    out = tmp_path / "cbd" / "seed-0" / "init"
    init_cbd(models["small"], models["large"], TARGET, out, alpha=0.5)
    init_cbd(models["small"], models["large"], TARGET, out, alpha=0.25, overwrite=True)
    assert json.loads((out / "baseline.json").read_text())["alpha"] == 0.25
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        init_cbd(models["small"], models["large"], TARGET, out, alpha=0.5, overwrite=True)
