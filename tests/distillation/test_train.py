"""The plain per-worker loop (no Ray): every objective lowers its own held-out loss on
Dolly records; schedules, batch selection, local checkpoints and resume."""
from __future__ import annotations

import math

import pytest
import torch

from cbd_ray import objectives
from cbd_ray.data import collate, encode_records, left_padded_prompts, read_instructions
from cbd_ray.generate import sample
from cbd_ray.train import DistillConfig, _load_model, global_indices, lr_factor, train_loop_per_worker

from distill_models import DOLLY_EVAL, DOLLY_TRAIN, make_pair

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    return make_pair(tmp_path_factory.mktemp("pair"), tokenizer)


def _cfg(objective: str, **kw) -> DistillConfig:
    base = dict(objective=objective, divergence="fkl", steps=12, batch_size=4, max_len=64, lr=3e-3,
                checkpoint_every=12, eval_limit=16, data_limit=64, log_every=0, device="cpu", max_new_tokens=12,
                warmup=2, ppo_epochs=2)
    base.update(kw)
    return DistillConfig(**base)


def _run(cfg: DistillConfig, pair, shared_data, run_dir) -> dict:
    teacher, student = pair
    return train_loop_per_worker({"cfg": cfg.model_dump(), "teacher_dir": str(teacher), "student_dir": str(student),
                                  "data": str(shared_data / DOLLY_TRAIN), "run_dir": str(run_dir)})


def _heldout(cfg: DistillConfig, model_dir, pair, tokenizer, shared_data) -> float:
    """The objective's own loss on held-out Dolly records, for the model in ``model_dir``."""
    student = _load_model(str(model_dir), torch.float32)
    teacher = _load_model(str(pair[0]), torch.float32)
    rows = encode_records(tokenizer, read_instructions(shared_data / DOLLY_EVAL, 16), cfg.max_len)
    batch = collate(rows, tokenizer.pad_token_id)
    ctx = objectives.StepContext(vocab=512, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                 max_len=cfg.max_len)
    if cfg.objective == "seqkd":  # its own loss: cross-entropy on the teacher's answers (fixed samples)
        ids, attn = left_padded_prompts(batch, tokenizer.pad_token_id)
        out = sample(teacher, ids, attn, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(5))
        seq = {"input_ids": out.sequences, "attention_mask": torch.cat(
            [attn, out.response_mask[:, out.prompt_length:].long()], 1), "loss_mask": out.response_mask.long()}
        with torch.no_grad():
            return float(objectives.ce_on(student, seq, cfg)[0])
    return objectives.eval_loss(student, teacher, batch, cfg, ctx)["loss"]


@pytest.mark.parametrize("objective,extra", [
    ("sft", {}),
    ("kd", {"divergence": "fkl"}),
    ("on_policy", {"on_policy_fraction": 0.5, "divergence": "rkl"}),
    ("seqkd", {"seqkd_source": "teacher", "max_new_tokens": 8, "lr": 5e-3, "steps": 10, "checkpoint_every": 10}),
    ("minillm", {"divergence": "rkl", "steps": 8, "checkpoint_every": 8, "lr": 5e-3}),
])
def test_objective_lowers_its_own_heldout_loss(objective, extra, pair, tokenizer, shared_data, tmp_path):
    cfg = _cfg(objective, **extra)
    before = _heldout(cfg, pair[1], pair, tokenizer, shared_data)
    m = _run(cfg, pair, shared_data, tmp_path)
    after = _heldout(cfg, tmp_path / "checkpoints" / f"step_{cfg.steps}" / "model", pair, tokenizer, shared_data)
    assert math.isfinite(m["loss"]) and m["step"] == cfg.steps
    print(f"{objective}: held-out {before:.4f} -> {after:.4f}")
    assert after < 0.98 * before, (objective, before, after)
    assert m["student_tokens"] > 0
    if cfg.needs_teacher:
        assert m["teacher_tokens"] > 0
    else:
        assert m["teacher_tokens"] == 0


def test_minillm_reports_policy_single_step_and_lm_parts(pair, shared_data, tmp_path):
    from cbd_ray.tiny import builtin_text

    text = tmp_path / "pretrain.txt"
    text.write_text(builtin_text()[:20_000])
    m = _run(_cfg("minillm", steps=2, checkpoint_every=100, lm_coef=0.5, lm_data=str(text)), pair, shared_data, tmp_path)
    first = m["history"][0]
    assert {"loss_pg", "loss_single_step_rkl", "loss_reward", "loss_pt", "loss_lm_ce", "loss_lm_fkl"} <= set(first)
    assert first["loss_single_step_rkl"] > 0 and first["loss_lm_ce"] > 1.0
    # pretraining term (kd_ratio 0.5): half CE, half forward KD on the text; lm_coef 0.5 on top
    assert first["loss_pt"] == pytest.approx(0.5 * first["loss_lm_ce"] + 0.5 * first["loss_lm_fkl"], rel=1e-4)
    assert first["loss"] == pytest.approx(
        first["loss_pg"] + first["loss_single_step_rkl"] + 0.5 * first["loss_pt"], rel=1e-4)


def test_resume_from_local_checkpoint_continues_the_same_run(pair, shared_data, tmp_path):
    cfg = _cfg("kd", steps=4, checkpoint_every=2)
    full = _run(cfg, pair, shared_data, tmp_path / "full")
    # crash at step 3 on the first attempt, then rerun: resumes from the step-2 checkpoint
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        _run(cfg.model_copy(update={"fail_at_step": 3}), pair, shared_data, tmp_path / "crash")
    again = _run(cfg.model_copy(update={"fail_at_step": 3}), pair, shared_data, tmp_path / "crash")
    assert [h["step"] for h in again["history"]] == [3, 4]
    assert again["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert again["student_tokens"] == full["student_tokens"]


def test_lr_schedule_warmup_then_cosine_or_constant():
    cfg = DistillConfig(steps=10, warmup=2, lr=1.0)
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0) and lr_factor(10, cfg) == pytest.approx(0.0)
    assert lr_factor(6, cfg) == pytest.approx(0.5)
    const = cfg.model_copy(update={"schedule": "constant"})
    assert lr_factor(7, const) == 1.0


def test_global_batch_is_the_same_whatever_the_worker_count():
    steps = [global_indices(s, 6, 10, seed=3) for s in range(4)]
    assert all(len(b) == 6 for b in steps)
    first_epoch = steps[0] + steps[1][:4]
    assert sorted(first_epoch) == list(range(10))  # one permutation per epoch, no repeats
    assert global_indices(2, 6, 10, seed=3) == steps[2]
    assert global_indices(0, 6, 10, seed=4) != steps[0]


def test_config_rejects_batches_that_do_not_split():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="multiple of workers"):
        DistillConfig(batch_size=5, workers=2)
    with pytest.raises(ValidationError, match="micro_batch 3 must divide"):
        DistillConfig(batch_size=8, workers=2, micro_batch=3)
    assert DistillConfig(batch_size=8, workers=2, micro_batch=2).accumulation == 2
    # a micro-batch at least as large as the share forwards the share whole (more workers, same config)
    wide = DistillConfig(batch_size=32, workers=16, micro_batch=4)
    assert (wide.micro, wide.accumulation) == (2, 1)


_DS_SCRIPT = """
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from cbd_ray.train import train_loop_per_worker
config = json.loads(sys.argv[2])
out = {}
for stage in json.loads(sys.argv[3]):
    c = {**config, "cfg": {**config["cfg"], "deepspeed": stage}}
    full = train_loop_per_worker({**c, "run_dir": f"{sys.argv[4]}/full{stage}"})
    cut = {**c, "cfg": {**c["cfg"], "fail_at_step": 3}, "run_dir": f"{sys.argv[4]}/cut{stage}"}
    try:
        train_loop_per_worker(cut)
    except RuntimeError as exc:
        assert "injected failure" in str(exc), exc
    again = train_loop_per_worker(cut)
    out[stage] = {"full": [h["loss"] for h in full["history"]], "again": [h["loss"] for h in again["history"]]}
print("LOSSES", json.dumps(out))
"""


def _max_diff(a, b) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.slow
def test_deepspeed_takes_the_plain_loops_steps_and_resumes_where_it_left_off(pair, shared_data, tmp_path):
    """ZeRO-1 and ZeRO-2 (CPU, gloo) in a subprocess, so their process group stays out of the
    test session: each takes the plain loop's steps, and a run killed after its step-2
    checkpoint and started again ends with the uninterrupted run's weights (DeepSpeed's own
    checkpoint restores the fp32 masters, the moments and the schedule)."""
    import json
    import os
    import random
    import subprocess
    import sys

    cfg = _cfg("kd", steps=5, micro_batch=2, checkpoint_every=2, keep_checkpoints=2)
    config = {"cfg": cfg.model_dump(), "teacher_dir": str(pair[0]), "student_dir": str(pair[1]),
              "data": str(shared_data / DOLLY_TRAIN)}
    plain = [h["loss"] for h in train_loop_per_worker(config)["history"]]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))}
    proc = subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(random.randint(20000, 40000)), json.dumps(config),
                           "[1, 2]", str(tmp_path)], capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES"))
    runs = json.loads(line.split(" ", 1)[1])
    for stage in ("1", "2"):
        assert runs[stage]["full"] == pytest.approx(plain, rel=1e-5)
        assert runs[stage]["again"] == pytest.approx(plain[2:], rel=1e-5)  # steps 3..5 after the resume
        full, cut = tmp_path / f"full{stage}" / "checkpoints", tmp_path / f"cut{stage}" / "checkpoints"
        assert _max_diff(full / "step_5" / "model", cut / "step_5" / "model") < 1e-5
        assert sorted(p.name for p in full.iterdir()) == ["step_4", "step_5"]  # keep_checkpoints
    assert plain[-1] < plain[0]


def test_best_checkpoint_by_rouge_l_on_greedy_answers(pair, shared_data, tmp_path):
    cfg = _cfg("sft", steps=2, checkpoint_every=1, select_best_by="rougeL", rouge_samples=4, max_new_tokens=8,
               eval_limit=4)
    teacher, student = pair
    m = train_loop_per_worker({"cfg": cfg.model_dump(), "teacher_dir": str(teacher), "student_dir": str(student),
                               "data": str(shared_data / DOLLY_TRAIN), "eval_data": str(shared_data / DOLLY_EVAL),
                               "run_dir": str(tmp_path)})
    scores = [h["eval_rougeL"] for h in m["history"]]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert m["best_value"] == max(scores) and m["best_step"] == 1 + scores.index(max(scores))


def test_minillm_with_pretraining_text_resumes_at_the_exact_sample(pair, shared_data, tmp_path):
    """A MiniLLM run with its pretraining term, killed after its step-2 checkpoint and run
    again, takes the uninterrupted run's steps 3 and 4: same rollouts, same text blocks."""
    from cbd_ray.tiny import builtin_text

    text = tmp_path / "pretrain.txt"
    text.write_text(builtin_text()[:40_000])
    cfg = _cfg("minillm", steps=4, checkpoint_every=2, ppo_epochs=2, micro_batch=2, lm_data=str(text))
    full = _run(cfg, pair, shared_data, tmp_path / "full")
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        _run(cfg.model_copy(update={"fail_at_step": 3}), pair, shared_data, tmp_path / "cut")
    again = _run(cfg.model_copy(update={"fail_at_step": 3}), pair, shared_data, tmp_path / "cut")
    assert [h["step"] for h in again["history"]] == [3, 4]
    for key in ("loss", "loss_lm_ce", "loss_pg"):
        assert [h[key] for h in again["history"]] == pytest.approx([h[key] for h in full["history"][2:]], rel=1e-6)


def test_minillm_runs_its_student_without_dropout(pair, shared_data, tmp_path):
    """LMOps keeps its policy in eval mode for RL: a GPT-2 student with dropout 0.1 ends two
    MiniLLM steps with exactly the weights of the same student without dropout; with dropout
    left on (dropout_off false) it ends elsewhere."""
    import json
    import shutil

    noisy = tmp_path / "student_dropout"
    shutil.copytree(pair[1], noisy)
    conf = json.loads((noisy / "config.json").read_text())
    assert conf["resid_pdrop"] == conf["embd_pdrop"] == conf["attn_pdrop"] == 0.0
    (noisy / "config.json").write_text(json.dumps({**conf, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}))
    cfg = _cfg("minillm", steps=2, checkpoint_every=2, max_new_tokens=8)
    assert cfg.dropout_off
    for name, student, c in (("plain", pair[1], cfg), ("dropout", noisy, cfg),
                             ("dropout_on", noisy, cfg.model_copy(update={"dropout_off": False}))):
        _run(c, (pair[0], student), shared_data, tmp_path / name)
    final = {n: tmp_path / n / "checkpoints" / "step_2" / "model" for n in ("plain", "dropout", "dropout_on")}
    assert _max_diff(final["plain"], final["dropout"]) == 0.0
    assert _max_diff(final["plain"], final["dropout_on"]) > 1e-6


def test_an_eval_mode_student_keeps_gradient_checkpointing_through_sampling(pair, tokenizer):
    """Without dropout the student is in eval mode, but its checkpointed layers keep training
    mode (transformers checkpoints only those), also after the sampler switched it to eval."""
    from cbd_ray.train import set_student_mode

    model = _load_model(str(pair[1]), torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_student_mode(model, True)
    blocks = list(model.transformer.h)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    ids = torch.tensor([[5, 6, 7, 8]])
    sample(model, ids, torch.ones_like(ids), 3, eos_token_id=tokenizer.eos_token_id,
           pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert all(b.training for b in blocks) and not model.training and drops and not any(d.training for d in drops)
    calls = []
    blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2  # the forward, and its recomputation in backward
    set_student_mode(model, False)
    assert all(m.training for m in model.modules())


def test_max_prompt_epochs_ends_the_run_at_its_last_checkpoint_and_long_prompts_are_dropped(
        pair, tokenizer, shared_data, tmp_path):
    """LMOps stops at total_iters or after its epochs over the prompts, whichever comes first,
    and drops prompts over max_prompt_length: the last step taken is evaluated and
    checkpointed, and the metrics say why the run ended and how many records were dropped."""
    from cbd_ray.data import render_prompt
    from cbd_ray.train import planned_steps

    assert planned_steps(DistillConfig(steps=100, batch_size=4, max_prompt_epochs=10), 16) == (40, "max_prompt_epochs")
    assert planned_steps(DistillConfig(steps=30, batch_size=4, max_prompt_epochs=10), 16) == (30, "steps")
    assert planned_steps(DistillConfig(steps=5, batch_size=3, max_prompt_epochs=0.1), 30) == (1, "max_prompt_epochs")
    assert planned_steps(DistillConfig(steps=5, batch_size=3), 30) == (5, "steps")
    # MiniLLM's prompts are its rollouts, one batch per ppo_epochs steps: 10 epochs of 14,000
    # prompts are 547 rollouts of 256, and the last one keeps its 4 PPO epochs
    paper = DistillConfig(objective="minillm", steps=5000, batch_size=256, ppo_epochs=4)
    assert planned_steps(paper, 14_000) == (547 * 4, "max_prompt_epochs")
    assert planned_steps(paper, 40_000) == (5000, "steps")
    recs = read_instructions(shared_data / DOLLY_TRAIN, 16)
    long = sum(len(tokenizer(render_prompt(r["instruction"], r["context"]), add_special_tokens=False)["input_ids"])
               > 120 for r in recs)
    assert 0 < long < 12
    cfg = _cfg("sft", steps=6, data_limit=16, max_len=128, max_prompt_len=120, max_prompt_epochs=0.5,
               checkpoint_every=100, eval_limit=4)
    teacher, student = pair
    m = train_loop_per_worker({"cfg": cfg.model_dump(), "teacher_dir": str(teacher), "student_dir": str(student),
                               "data": str(shared_data / DOLLY_TRAIN), "eval_data": str(shared_data / DOLLY_EVAL),
                               "run_dir": str(tmp_path)})
    steps = math.ceil(0.5 * (16 - long) / 4)  # half an epoch over the records kept, 4 a step
    assert steps < cfg.steps and m["step"] == steps and [h["step"] for h in m["history"]] == list(range(1, steps + 1))
    assert m["stopped_by"] == "max_prompt_epochs" and m["dropped_prompts"] == long and "eval_loss" in m
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{steps}"]


def test_a_worker_killed_for_memory_is_one_line_naming_the_stage():
    from cbd_ray.train import out_of_memory_error

    err = RuntimeError("Training failed due to worker errors: 1 worker(s) were killed due to the node running low "
                       "on memory")
    msg = str(out_of_memory_error(err, "chain_1"))
    assert msg.startswith("chain_1: a training worker was killed because its node ran out of memory")
    assert "\n" not in msg and "micro_batch" in msg and "gradient_checkpointing" in msg
    assert out_of_memory_error(RuntimeError("NCCL not built in"), "chain_1") is None
