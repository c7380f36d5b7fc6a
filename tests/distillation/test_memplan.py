"""The memory plan (cbd_ray.memplan): its activation model against torch's saved tensors, its
monotonicity in the settings, micro_batch "auto", and `cbd validate --plan`. Pure CPU, tiny
models, no Ray."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cbd_ray import memplan
from cbd_ray.stages.memory import chain_training_stages, plan_chain
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.train import DistillConfig

from conftest import ROOT

GPU_CONFIGS = ["gpt2", "pythia", "qwen3", "bridge_llama3_gpt2", "bridge_qwen3_gpt2"]
TEACHER = {"family": "gpt2", "layers": 4, "hidden": 256, "heads": 4, "vocab_size": 5000}
STUDENT = {"family": "gpt2", "layers": 2, "hidden": 128, "heads": 2, "vocab_size": 5000}


def _cfg(**kw) -> DistillConfig:
    base = dict(objective="kd", batch_size=8, max_len=128, device="cuda", workers=1)
    return DistillConfig(**{**base, **kw})


def _total(cfg: DistillConfig, micro: int | None = None, world: int = 1, device: str = "cuda") -> int:
    return memplan.plan_distill(cfg, TEACHER, STUDENT, world, device, micro=micro).total


# ---------------------------------------------------------------------------- the activation model


def _hf_models():
    from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config)

    return {
        "gpt2-dropout": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300),
        "gpt2-no-attn-dropout": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, attn_pdrop=0.0),
        "gpt_neox": GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=300),
        "gpt_neox-sequential-dropout": GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                     intermediate_size=256, vocab_size=300, hidden_dropout=0.1,
                                                     attention_dropout=0.1, use_parallel_residual=False),
        "llama-gqa": LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=192, vocab_size=300),
        "qwen2": Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=192, vocab_size=300),
        "qwen3-head_dim": Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=24, intermediate_size=192, vocab_size=300),
    }


def _saved_bytes(model, rows: int, seq: int) -> int:
    """Bytes of the distinct storages a train-mode forward saves for backward (parameters
    excluded), as torch's saved-tensor hooks see them; one row padded (a mask is present)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(rows, seq, dtype=torch.long)
    attn[0, -3:] = 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True, logits_to_keep=1,
              use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("name", list(_hf_models()))
def test_activation_model_matches_torchs_saved_tensors(name):
    import torch
    from transformers import AutoModelForCausalLM

    config = _hf_models()[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    shape = memplan.model_shape(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    p = memplan.precision("cpu")
    for rows, seq in ((2, 24), (3, 40)):
        predicted = rows * seq * (shape.layers * memplan.layer_bytes(shape, seq, p) + memplan.base_bytes(shape, p))
        measured = _saved_bytes(model, rows, seq)
        assert abs(predicted - measured) <= 0.02 * measured, (name, rows, seq, predicted, measured)


def test_family_configs_and_shape_dicts_agree():
    from transformers import GPT2Config

    hf = memplan.model_shape(GPT2Config(n_layer=12, n_embd=768, n_head=12))
    spec = memplan.model_shape({"family": "gpt2", "layers": 12, "hidden": 768, "heads": 12, "vocab_size": 50257})
    assert hf == spec and abs(hf.params - 124.44e6) < 0.01e6
    with pytest.raises(CBDError, match="family"):
        memplan.model_shape({"layers": 2, "hidden": 64, "heads": 2, "vocab_size": 10})


def test_mirrored_loss_constants_match_the_losses():
    from cbd_ray import losses

    assert (memplan.LIVE_FUSED, memplan.LIVE_AUTOGRAD) == (losses.LIVE_FUSED, losses.LIVE_AUTOGRAD)
    cfg = _cfg()
    rows = losses.rows_for_budget(cfg.kd_chunk_bytes, 50257, 6)
    assert memplan.chunk_bytes(cfg, 50257, 6) == rows * 50257 * 4 * 6


# ---------------------------------------------------------------------------- monotonicity


def test_plan_grows_with_micro_batch():
    cfg = _cfg(batch_size=16)
    totals = [_total(cfg, m) for m in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == 5
    acts = [memplan.plan_distill(cfg, TEACHER, STUDENT, 1, micro=m).parts["activations"] for m in (1, 2, 4, 8)]
    assert acts[3] == 8 * acts[0]  # activations are linear in the rows


def test_checkpointing_shrinks_the_activations():
    deep = {**STUDENT, "layers": 12}
    for device in ("cuda", "cpu"):
        off = memplan.plan_distill(_cfg(), TEACHER, deep, 1, device, micro=8)
        on = memplan.plan_distill(_cfg(gradient_checkpointing=True), TEACHER, deep, 1, device, micro=8)
        assert on.parts["activations"] < off.parts["activations"] / 4 and on.total < off.total


def test_zero_stage_and_world_shrink_the_optimiser_state():
    big = {"family": "llama", "layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 2, "ffn": 2816, "vocab_size": 32000}

    def state(ds, world):
        cfg = _cfg(objective="sft", batch_size=8 * world, workers=world, deepspeed=ds, micro_batch=1)
        parts = memplan.plan_distill(cfg, None, big, world, "cuda").parts
        return parts["optimizer"] + parts["gradients"] + parts["weights"]

    assert state(1, 2) < state(0, 2) and state(2, 2) < state(1, 2)
    assert state(2, 8) < state(2, 2) < state(2, 1)
    assert state(2, 8) < state(None, 1)


def test_minillm_peak_is_the_larger_graph_not_the_sum():
    cfg = _cfg(objective="minillm", lm_data="text.txt", batch_size=8)
    plan = memplan.plan_distill(cfg, TEACHER, STUDENT, 1, micro=4)
    n, v = 4 * cfg.max_len, 5000
    s, t = memplan.model_shape(STUDENT), memplan.model_shape(TEACHER)
    pt = memplan.ce_bytes(cfg, s, n, v) + memplan.forward_bytes(t, 4, cfg.max_len, 2) + memplan.kd_bytes(
        cfg, s, t, n, v, memplan.precision("cuda"), "fkl")
    assert plan.parts["loss"] == max(pt, n * (4 * s.hidden + 16) + memplan.chunk_bytes(cfg, v, memplan.LIVE_POLICY, n))
    assert plan.parts["rollout"] > 0 and plan.parts["kv_cache"] > 0
    assert plan.total == plan.resident + max(plan.phase_bytes().values())
    assert "activations" in plan.table(80 * memplan.GiB) and "fits 80.0 GiB" in plan.table(80 * memplan.GiB)


# ---------------------------------------------------------------------------- micro_batch auto


def test_auto_picks_the_largest_micro_batch_that_fits():
    cfg = _cfg(micro_batch="auto")
    assert cfg.micro_batch == "auto"
    with pytest.raises(ConfigError, match="not resolved"):
        _ = cfg.micro
    t2, t4 = _total(_cfg(), 2), _total(_cfg(), 4)
    budget = (t2 + t4) / 2 / 0.9  # 2 rows fit with the 10% margin, 4 do not
    got = _cfg(micro_batch="auto", device_memory_gib=budget / memplan.GiB).resolved(TEACHER, STUDENT, "chain_1")
    assert got.micro_batch == 2 and got.micro == 2 and got.accumulation == 4
    roomy = _cfg(micro_batch="auto", device_memory_gib=1000.0).resolved(TEACHER, STUDENT)
    assert roomy.micro_batch == 8
    assert _cfg(micro_batch=4).resolved(TEACHER, STUDENT).micro_batch == 4  # not auto: unchanged


def test_auto_refuses_with_one_line_when_nothing_fits():
    cfg = _cfg(micro_batch="auto", device_memory_gib=0.5)
    with pytest.raises(CBDError) as exc:
        cfg.resolved(TEACHER, STUDENT, "chain_2")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("chain_2: micro_batch 1 needs")
    for advice in ("more workers", "deepspeed: 2", "gradient_checkpointing: true", "device_memory_gib"):
        assert advice in msg


def test_auto_on_cpu_shares_the_nodes_memory():
    cfg = _cfg(micro_batch="auto", device="cpu", workers=2, batch_size=8)
    device, budget, why = memplan.device_budget(cfg)
    assert device == "cpu" and budget == memplan.node_memory() / 2 and "2 worker" in why
    with pytest.raises(CBDError, match="device_memory_gib"):
        memplan.device_budget(_cfg(micro_batch="auto", device="npu"))


def test_schema_passes_device_memory_to_every_stage():
    from cbd_ray.schema import load_config

    cfg = load_config(ROOT / "configs" / "gpt2.yaml", ["scaling.device_memory_gib=40", "distill.micro_batch=auto"])
    assert cfg.step_distill(0)["device_memory_gib"] == 40
    plans = plan_chain(cfg)
    assert [p.stage for p in plans] == ["source_sft", "gpt2-large_sft", "chain_1", "gpt2-medium_sft", "chain_2",
                                        "gpt2-base_sft", "chain_3"]
    assert all(p.fits and p.plan.total <= 0.9 * 40 * memplan.GiB for p in plans)


# ---------------------------------------------------------------------------- cbd validate --plan


def test_validate_plan_exits_zero_when_every_stage_fits(capsys):
    from cbd_ray.cli import main

    assert main(["validate", str(ROOT / "configs" / "gpt2.yaml"), "--plan", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    for stage in ("source_sft", "chain_1", "chain_2", "chain_3"):
        assert f"stage {stage}:" in out
    assert "DOES NOT FIT" not in out


def test_validate_plan_of_a_comparison_config_plans_its_chain(capsys):
    from cbd_ray.cli import main

    assert main(["validate", str(ROOT / "configs" / "reproduce_paperpath_cpu.yaml"), "--plan",
                 "--device-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "the chain of this comparison" in out
    for stage in ("source_sft", "a1_pretrain", "a1_sft", "chain_1", "a3_pretrain", "chain_3"):
        assert f"stage {stage}:" in out
    assert main(["validate", str(ROOT / "configs" / "grid_demo.yaml"), "--plan"]) == 2  # a grid trains nothing
    assert "plans the training stages of a chain or reproduce config, not a grid config" in capsys.readouterr().err


def test_validate_plan_names_each_stage_that_does_not_fit(capsys):
    from cbd_ray.cli import main

    rc = main(["validate", str(ROOT / "configs" / "gpt2.yaml"), "--plan", "--device-memory", "16"])
    cap = capsys.readouterr()
    assert rc == 2
    bad = [line for line in cap.err.splitlines() if "needs" in line]
    assert {line.split(":")[0] for line in bad} == {"source_sft", "chain_1"}  # chain_2, chain_3 fit 16 GiB


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_fit_an_80_gib_device(name):
    from cbd_ray.schema import load_config

    plans = plan_chain(load_config(ROOT / "configs" / f"{name}.yaml"), 80)
    assert plans and all(p.fits for p in plans), [p.line for p in plans if not p.fits]


def test_validate_help_stays_light():
    code = ("import sys\nfrom cbd_ray.cli import main\ntry:\n    main(['validate', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]\nprint(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "--plan" in out.stdout and "--device-memory" in out.stdout
    assert out.stdout.strip().endswith("[]"), out.stdout


def test_one_backward_per_step_makes_gradients_in_backward():
    """No accumulation, no DeepSpeed: gradients are None when the graph is built (set to
    None after each step), so they count in the step phase, not beside the activations."""
    whole = memplan.plan_distill(_cfg(objective="sft"), None, STUDENT, 1, "cpu", micro=8)
    part = memplan.plan_distill(_cfg(objective="sft"), None, STUDENT, 1, "cpu", micro=4)
    assert "gradients" not in whole.resident_parts and "gradients" in whole.phase_parts["step"]
    assert "gradients" in part.resident_parts
    ds = memplan.plan_distill(_cfg(objective="sft", deepspeed=2), None, STUDENT, 1, "cpu", micro=8)
    assert "gradients" in ds.resident_parts


def test_run_distill_resolves_auto_before_any_work(tmp_path, tokenizer, shared_data):
    """run_distill plans micro_batch "auto" right after its cheap checks, before Ray starts:
    an impossible budget is one line naming the stage, and the local Ray stays down."""
    import ray

    from cbd_ray.train import run_distill
    from distill_models import DOLLY_TRAIN, make_pair

    teacher, student = make_pair(tmp_path / "pair", tokenizer)
    cfg = DistillConfig(objective="kd", batch_size=4, max_len=64, device="cpu", micro_batch="auto",
                        device_memory_gib=0.001, data_limit=8)
    was_up = ray.is_initialized()
    with pytest.raises(CBDError) as exc:
        run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "out", cfg, name="chain_9")
    assert str(exc.value).startswith("chain_9: micro_batch 1 needs") and "\n" not in str(exc.value)
    assert ray.is_initialized() == was_up and not (tmp_path / "out").exists()
    got = cfg.model_copy(update={"device_memory_gib": 4.0}).resolved(teacher, student, "chain_9")
    assert got.micro_batch == 4  # model directories are read with AutoConfig


def test_an_anchors_own_sft_is_a_planned_stage():
    from cbd_ray.schema import load_config

    cfg = load_config(ROOT / "configs" / "gpt2.yaml",
                      ["anchors.0.sft=null", "anchors.2.sft=null", "anchors.1.sft.distill.micro_batch=2"])
    stages = [s for s, *_ in chain_training_stages(cfg)]
    assert stages == ["source_sft", "chain_1", "gpt2-medium_sft", "chain_2", "chain_3"]
    plan = {p.stage: p for p in plan_chain(cfg, 80)}["gpt2-medium_sft"].plan
    assert plan.micro == 2 and plan.about["teacher"] == "none" and "24x1024x16" in plan.about["student"]


def test_an_anchor_trained_apart_plans_its_pretraining_as_a_float32_lm_step():
    from cbd_ray.schema import load_config

    cfg = load_config(ROOT / "configs" / "gpt2.yaml", ["anchors.0.init=pretrain", "anchors.0.model=null",
                                                       "anchors.0.pretrain={steps: 10, batch_size: 6, seq_len: 256}"])
    stages = [s for s, *_ in chain_training_stages(cfg)]
    name = f"{cfg.anchors[0].name}_pretrain"
    assert stages.index(name) < stages.index("chain_1")  # before its own SFT and chain step
    settings = dict(chain_training_stages(cfg)[stages.index(name)][1])
    assert (settings["objective"], settings["batch_size"], settings["max_len"]) == ("sft", 6, 256)
    plans = {p.stage: p for p in plan_chain(cfg, 80)}
    p = plans[name].plan
    assert p.micro == 6 and p.world == 1 and p.device == "cuda (float32, no autocast)"  # as pretrain_lm runs
    # the same step on more rows needs more memory: the plan follows the settings
    bigger = load_config(ROOT / "configs" / "gpt2.yaml", ["anchors.0.init=pretrain", "anchors.0.model=null",
                                                          "anchors.0.pretrain={steps: 10, batch_size: 12, seq_len: 256}"])
    assert {q.stage: q for q in plan_chain(bigger, 80)}[name].plan.total > p.total
