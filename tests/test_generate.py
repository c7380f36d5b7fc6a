"""The sampler against Hugging Face ``generate`` on tiny models (pure CPU, a few seconds)."""
from __future__ import annotations

import pytest
import torch

from cbd_ray.generate import filter_probs, generate_texts, sample
from cbd_ray.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 1


def _model(family, seed=0, **shape):
    m = make_tiny_model(family, seed=seed, vocab_size=512, **shape)
    m.generation_config.eos_token_id = None  # only the eos we pass counts
    m.generation_config.pad_token_id = PAD
    return m


def _prompts(b=4, p=9, seed=0):
    """Left-padded random prompts of different lengths: [B, P] ids and mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 512, (b, p), generator=g)
    mask = torch.ones(b, p, dtype=torch.long)
    for i, n_pad in enumerate([0, 3, 1, 6][:b]):
        mask[i, :n_pad] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _hf_greedy(model, ids, mask, n, eos=None):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gpt_neox"])
def test_greedy_equals_hf_generate_with_left_padding(family):
    model = _model(family)
    ids, mask = _prompts()
    out = sample(model, ids, mask, 10, do_sample=False, pad_token_id=PAD)
    ref = _hf_greedy(model, ids, mask, 10)
    assert out.prompt_length == ids.shape[1] and not out.teacher_mixed
    assert torch.equal(out.sequences, ref)
    assert out.response_mask[:, :ids.shape[1]].sum() == 0 and out.response_mask[:, ids.shape[1]:].all()
    # with an EOS that greedy decoding actually reaches in one row: same tokens, pads, early stop
    eos = int(ref[0, ids.shape[1] + 2])
    out = sample(model, ids, mask, 10, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 10, eos=eos))


def _check_eos_contract(out, eos_ids, max_new):
    p = out.prompt_length
    assert out.sequences.shape[1] <= p + max_new
    gen, resp = out.sequences[:, p:], out.response_mask[:, p:]
    for row, m in zip(gen.tolist(), resp.tolist()):
        hits = [i for i, t in enumerate(row) if t in eos_ids]
        end = hits[0] + 1 if hits else len(row)
        assert m == [True] * end + [False] * (len(row) - end)  # mask stops at (and includes) EOS
        assert all(t == PAD for t in row[end:])                # nothing but pad after EOS
    return gen, resp


def test_sampling_stops_each_row_at_eos_and_respects_max_length():
    model = _model("qwen3")
    ids, mask = _prompts()
    eos_ids = list(range(2, 80))  # ~15% of the vocabulary: rows end at different steps
    g = torch.Generator().manual_seed(3)
    out = sample(model, ids, mask, 40, eos_token_id=eos_ids, pad_token_id=PAD, generator=g)
    gen, resp = _check_eos_contract(out, set(eos_ids), 40)
    lengths = resp.sum(1).tolist()
    assert len(set(lengths)) > 1, lengths  # the rows really did stop at different points
    assert gen.shape[1] == max(lengths)    # stopped as soon as the last row ended
    # without an EOS every row runs to max_new_tokens exactly
    out = sample(model, ids, mask, 7, pad_token_id=PAD, generator=g)
    assert out.sequences.shape == (4, ids.shape[1] + 7) and out.response_mask[:, ids.shape[1]:].all()


def test_sampling_is_deterministic_with_a_generator():
    model = _model("gpt2")
    ids, mask = _prompts()
    a = sample(model, ids, mask, 12, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    b = sample(model, ids, mask, 12, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    c = sample(model, ids, mask, 12, pad_token_id=PAD, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = _model("llama")
    ids, mask = _prompts()
    greedy = sample(model, ids, mask, 8, do_sample=False, pad_token_id=PAD).sequences
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(model, ids, mask, 8, top_k=1, pad_token_id=PAD, generator=g).sequences, greedy)
    assert torch.equal(sample(model, ids, mask, 8, top_p=1e-6, pad_token_id=PAD, generator=g).sequences, greedy)


def test_filter_probs_keeps_top_k_and_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    torch.testing.assert_close(filter_probs(probs, top_k=2), torch.tensor([[0.0, 0.625, 0.375, 0.0]]))
    # mass before the 3rd token is 0.8 < 0.85, so it is kept; the 4th (0.95 before it) is not
    kept = filter_probs(probs, top_p=0.85)
    assert (kept > 0).tolist() == [[False, True, True, True]]
    assert (filter_probs(probs, top_p=0.5) > 0).tolist() == [[False, True, False, False]]


def test_teacher_mix_one_greedy_equals_teacher_greedy():
    student = _model("qwen3", seed=0)
    teacher = _model("qwen3", seed=1, layers=3, hidden=96, heads=6)
    ids, mask = _prompts()
    mixed = sample(student, ids, mask, 10, do_sample=False, pad_token_id=PAD, teacher=teacher, teacher_mix=1.0)
    alone = sample(teacher, ids, mask, 10, do_sample=False, pad_token_id=PAD)
    assert mixed.teacher_mixed
    assert torch.equal(mixed.sequences, alone.sequences)
    assert not torch.equal(alone.sequences, sample(student, ids, mask, 10, do_sample=False, pad_token_id=PAD).sequences)
    # a real mixture samples fine, and the models come back in the mode they were in
    student.train()
    half = sample(student, ids, mask, 6, pad_token_id=PAD, teacher=teacher, teacher_mix=0.2,
                  generator=torch.Generator().manual_seed(0))
    assert half.teacher_mixed and half.sequences.shape == (4, ids.shape[1] + 6)
    assert student.training and not teacher.training


def test_teacher_with_a_padded_vocabulary_mixes_over_the_shared_part():
    student = _model("qwen2", seed=0)
    teacher = make_tiny_model("qwen2", seed=2, vocab_size=576)  # 64 padding rows
    with torch.no_grad():
        teacher.lm_head.weight[512:] += 5.0  # padding the teacher would otherwise favour
    ids, mask = _prompts()
    out = sample(student, ids, mask, 8, pad_token_id=PAD, teacher=teacher, teacher_mix=0.9,
                 generator=torch.Generator().manual_seed(0))
    assert out.sequences.max() < 512


def test_bad_input_is_refused_before_any_forward():
    model = _model("gpt2")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, ids, mask.flip(1), 4)
    with pytest.raises(ValueError, match="positions"):
        sample(model, ids, mask, 1000)
    with pytest.raises(ValueError, match="teacher"):
        sample(model, ids, mask, 4, teacher_mix=0.5)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, ids, mask, 4, top_p=0.0)


def test_generate_texts_keeps_order_and_matches_one_prompt_at_a_time(tokenizer):
    model = make_tiny_model("gpt2", seed=0, vocab_size=len(tokenizer))
    prompts = ["Explain the Python topic 'assert'.", "What is a list?", "Hi", "Tell me about dictionaries in Python."]
    batched = generate_texts(model, tokenizer, prompts, 8, batch_size=3, do_sample=False)
    single = [generate_texts(model, tokenizer, [p], 8, do_sample=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)
