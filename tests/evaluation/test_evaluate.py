"""Scoring: log-likelihood requests, acc/acc_norm, Rouge-L, perplexity, model loading, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cbd_ray import evaluate as E
from cbd_ray.errors import CheckpointError
from cbd_ray.tasks import Request, mc_example
from cbd_ray.tiny import make_tiny_model, save_tiny_model

SHAPE = dict(layers=2, hidden=32, heads=4, max_positions=128)


def _model(tokenizer, family="gpt2", seed=0):
    return make_tiny_model(family, seed=seed, vocab_size=len(tokenizer), **SHAPE)


def test_rouge_l_identical_is_one_and_disjoint_is_zero():
    s = "The quick brown fox jumps over the lazy dog."
    assert E.rouge_l(s, s) == pytest.approx(1.0)
    assert E.rouge_l("alpha beta gamma", "delta epsilon zeta") == 0.0
    # stemming: "jumping" and "jumps" share a stem, so a partial match scores between 0 and 1
    partial = E.rouge_l("the fox jumping", s)
    assert 0.0 < partial < 1.0
    assert E.rouge_l("", s) == 0.0


def _manual_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) with an explicit log-softmax, one sequence."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()  # [T-1, V]
    total = 0.0
    for i, tok in enumerate(cont):
        row = logits[len(ctx) - 1 + i]
        m = row.max()
        log_z = m + torch.log(torch.exp(row - m).sum())
        total += float(row[tok] - log_z)
    return total


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen3"])
def test_score_matches_hand_computed_log_likelihood_in_padded_batches(tokenizer, family):
    model = _model(tokenizer, family, seed=1)
    reqs = [
        Request("The value of x is", " assigned by the statement."),
        Request("def f(x):\n    return", " x + 1"),
        Request("A", " B"),
        Request("The value of x is", " assigned by the statement."),  # duplicate: shares a row
        Request("Lists are mutable sequences, typically used to store collections of items.", " yes"),
    ]
    batched = E.score_choices(model, tokenizer, reqs, batch_size=3)
    single = [E.score_choices(model, tokenizer, [r], batch_size=1)[0] for r in reqs]
    manual = [_manual_loglik(model, tokenizer, r.context, r.continuation) for r in reqs]
    assert batched == pytest.approx(manual, abs=1e-4)
    assert single == pytest.approx(manual, abs=1e-4)
    assert all(s < 0 for s in manual)


def test_trailing_space_of_context_moves_to_continuation(tokenizer):
    ctx, cont = E.encode_pair(tokenizer, "Answer: ", "yes")
    ctx2, cont2 = E.encode_pair(tokenizer, "Answer:", " yes")
    assert (ctx, cont) == (ctx2, cont2)


def test_multiple_choice_picks_the_answer_a_trained_model_prefers(tokenizer):
    torch.manual_seed(0)
    model = _model(tokenizer, seed=2)
    context = "Question: Which keyword defines a function in Python?\nAnswer:"
    choices = ["class", "lambda", "def", "import"]
    gold = 2
    ex = mc_example(context, choices, gold)
    reqs = list(ex.requests)
    before = E.score_choices(model, tokenizer, reqs)
    ids = torch.tensor([tokenizer(context + " " + choices[gold], add_special_tokens=False)["input_ids"]])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = E.score_choices(model, tokenizer, reqs)
    # training raised the gold choice's likelihood and made it the arg-max
    assert after[gold] > before[gold]
    assert max(range(4), key=after.__getitem__) == gold
    metrics = E.mc_metrics([ex], after)
    assert metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0
    wrong = mc_example(context, choices, 0)
    assert E.mc_metrics([wrong], after)["acc"] == 0.0


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes():
    # choice 0 has 2 characters but 4 bytes; choice 1 has 3 characters and 3 bytes.
    ex = mc_example("ctx", ["éé", "abc"], gold=0)
    assert ex.norm_bytes == (4, 3) and ex.norm_chars == (2, 3)
    scores = [-4.0, -3.3]  # raw: choice 1; per char: -2.0 vs -1.1 -> choice 1; per byte: -1.0 vs -1.1 -> choice 0
    m = E.mc_metrics([ex], scores)
    assert m["acc"] == 0.0
    assert m["acc_norm"] == 0.0  # lm-eval's acc_norm: characters
    assert m["acc_bytes"] == 1.0
    two = E.mc_metrics([ex, mc_example("ctx", ["éé", "abc"], gold=1)], scores + scores)
    assert two["acc"] == 0.5 and two["acc_norm"] == 0.5 and two["acc_bytes"] == 0.5
    assert two["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 1))


def test_perplexity_of_uniform_logits_is_the_vocab_size(tokenizer):
    from cbd_ray.tiny import builtin_text

    model = _model(tokenizer)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied head: every logit is 0, the distribution uniform
    text = builtin_text()[:3000]
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    res = E.perplexity(model, tokenizer, text, max_length=64, stride=24, batch_size=3)
    assert res["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert res["tokens"] == n_tokens - 1  # every token but the first scored exactly once
    assert res["windows"] > 3


def test_perplexity_of_one_window_matches_the_model_loss(tokenizer):
    model = _model(tokenizer, seed=3)
    text = "Return the absolute value of a number. The argument may be an integer."
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    res = E.perplexity(model, tokenizer, text)
    assert res["nll"] == pytest.approx(loss, abs=1e-5)
    # strided windows shorter than the text give a different, still finite, estimate
    strided = E.perplexity(model, tokenizer, text, max_length=6, stride=2)
    assert strided["tokens"] == res["tokens"] and math.isfinite(strided["ppl"])


def test_perplexity_with_few_windows_tokenises_a_prefix_only_and_matches_the_full_text(tokenizer, monkeypatch):
    from cbd_ray.tiny import builtin_text

    model = _model(tokenizer, seed=5)
    text = builtin_text()[:60_000]
    calls: list[int] = []
    encode = E._encode
    monkeypatch.setattr(E, "_encode", lambda tok, t: calls.append(len(t)) or encode(tok, t))
    few = E.perplexity(model, tokenizer, text, max_length=32, stride=16, max_windows=3)
    assert max(calls) < len(text) // 10  # only a prefix was tokenised
    full_ids = encode(tokenizer, text)
    monkeypatch.setattr(E, "_encode_prefix", lambda tok, t, need, margin=64: full_ids)
    assert E.perplexity(model, tokenizer, text, max_length=32, stride=16, max_windows=3) == few
    assert few["windows"] == 3 and few["tokens"] == 31 + 2 * 16


def test_greedy_generation_is_the_same_batched_and_alone(tokenizer):
    model = _model(tokenizer, seed=4)
    prompts = ["The list", "A dictionary maps keys to values and", "x"]
    batched = E.generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    alone = [E.generate_greedy(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(a, str) for a in batched) and any(batched)
    # the same answers as Hugging Face's own greedy search, stopped at end-of-text
    for p, answer in zip(prompts, batched):
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        ref = ref.tolist()
        ref = ref[: ref.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ref else ref
        assert answer == tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_a_model_directory_that_does_not_load_gives_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="does not exist"):
        E.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        E.load_model(tmp_path / "empty")
    d = save_tiny_model(tmp_path / "m", "gpt2", tokenizer=tokenizer, **SHAPE)
    weights = next(d.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="does not load"):
        E.load_model(d)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        E.load_model(d)
    # evaluate_model refuses an unknown task before touching the (broken) model
    with pytest.raises(ValueError, match="known tasks"):
        E.evaluate_model(d, ["nope"])


def test_evaluate_model_and_cli_on_every_task(tmp_path, shared_data, gpt2_tokenizer, capsys):
    from cbd_ray.cli import main

    d = save_tiny_model(tmp_path / "m", "gpt2", tokenizer=gpt2_tokenizer, **SHAPE)
    limit = 3
    res = E.evaluate_model(d, list(E.TASKS), data_dir=shared_data, limit=limit, shots=1,
                           max_new_tokens=4, progress=False)
    assert [r["task"] for r in res] == list(E.TASKS)
    for r in res:
        assert r["model"] == str(d)
        if E.TASKS[r["task"]].kind == "perplexity":
            assert r["metrics"]["windows"] == limit and r["n"] > limit
            assert r["metrics"]["ppl"] == pytest.approx(math.exp(r["metrics"]["nll"]))
        else:
            # MMLU's limit is per subject, as lm-eval's; every other task's in total
            assert r["n"] == limit * (len(r["by_subject"]) if r["task"] == "mmlu" else 1)
            assert 0 <= r["prompts_cut"] <= r["n"]
            for k, v in r["metrics"].items():
                assert 0.0 <= v <= 1.0, (r["task"], k, v)
    dolly = next(r for r in res if r["task"] == "dolly")
    assert dolly["by_category"] and min(dolly["by_category"].values()) <= dolly["metrics"]["rougeL"] \
        <= max(dolly["by_category"].values())
    out = tmp_path / "res.json"
    capsys.readouterr()  # drop what the library printed so far: stdout must hold the JSON lines only
    rc = main(["evaluate", "--model", str(d), "--tasks", "boolq,mmlu", "--data-dir", str(shared_data),
               "--limit", "2", "--shots", "2", "--out", str(out), "--batch-size", "4", "--no-progress"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [x["task"] for x in lines] == ["boolq", "mmlu"]
    by = lines[1]["by_subject"]
    assert lines[1]["shots"] == 2 and lines[0]["n"] == 2 and lines[1]["n"] == 2 * len(by) == 2 * 57
    # MMLU's per-subject accuracies average to its subject-macro accuracy
    assert lines[1]["metrics"]["acc_subject_macro"] == pytest.approx(sum(by.values()) / len(by))
    assert json.loads(out.read_text()) == lines
    # an existing --out is not overwritten silently; a bad task is a usage error
    assert main(["evaluate", "--model", str(d), "--tasks", "boolq", "--data-dir", str(shared_data),
                 "--limit", "1", "--out", str(out), "--no-progress"]) == 2
    assert main(["evaluate", "--model", str(d), "--tasks", "boolq,quiz", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "unknown task 'quiz'" in err
