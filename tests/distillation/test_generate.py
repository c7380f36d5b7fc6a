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


# ---------------------------------------------------------------- host checks every k steps, stop ids


@pytest.mark.parametrize("every", [3, 8, 16])
def test_checking_every_k_steps_gives_the_per_token_result(every):
    """check_every=1 is the per-token version (a host check after every token); any other k
    gives the same sequences, masks and length, and leaves the generator where it would be."""
    model = _model("gpt2")
    ids, mask = _prompts()
    eos_ids = list(range(2, 80))  # rows end at different steps, the last well before max_new
    runs = []
    for k in (1, every):
        g = torch.Generator().manual_seed(5)
        out = sample(model, ids, mask, 40, eos_token_id=eos_ids, pad_token_id=PAD, generator=g, check_every=k)
        runs.append((out, torch.rand(4, generator=g)))  # the generator's state afterwards
    (a, ra), (b, rb) = runs
    assert a.sequences.shape[1] < ids.shape[1] + 40  # stopped early: the extra steps were dropped
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(ra, rb)
    # the default generator too (generator=None draws from torch's global one)
    states = []
    for k in (1, every):
        torch.manual_seed(11)
        out = sample(model, ids, mask, 40, eos_token_id=eos_ids, pad_token_id=PAD, check_every=k)
        states.append((out.sequences, torch.rand(4)))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


def test_greedy_checked_every_8_steps_equals_hf_generate_with_eos():
    model = _model("gpt2")
    ids, mask = _prompts()
    ref = _hf_greedy(model, ids, mask, 20)
    eos = int(ref[0, ids.shape[1] + 2])  # reached by row 0 after 3 tokens
    out = sample(model, ids, mask, 20, do_sample=False, pad_token_id=PAD, eos_token_id=eos, check_every=8)
    assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 20, eos=eos))
    _check_eos_contract(out, {eos}, 20)


def test_stop_ids_unions_the_generation_config_and_the_tokenizer():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from cbd_ray.generate import stop_ids

    model = _model("qwen3")
    model.generation_config.eos_token_id = [7, 5]
    tok = SimpleNamespace(eos_token_id=5)
    assert stop_ids(model) == [7, 5]
    assert stop_ids(model, SimpleNamespace(eos_token_id=9)) == [7, 5, 9]
    assert stop_ids(model, tok) == [7, 5]  # no repeats
    assert stop_ids(SimpleNamespace(module=model), tok) == [7, 5]  # DDP / DeepSpeed wrapper
    assert stop_ids(GenerationConfig(eos_token_id=3)) == [3]
    assert stop_ids(model.config) == _as_list(model.config.eos_token_id)  # a model config read as is
    model.generation_config.eos_token_id = None
    assert stop_ids(model) == [] and stop_ids(model, tok) == [5]


def _as_list(v):
    return [] if v is None else ([v] if isinstance(v, int) else list(v))


def test_a_model_listing_two_eos_ids_stops_at_the_second():
    """Qwen3-style: generation_config.eos_token_id = [im_end, endoftext]; a row that emits
    only the second one must still end there (stopping at the tokenizer's EOS alone would not)."""
    from cbd_ray.generate import stop_ids

    model = _model("qwen3")
    ids, mask = _prompts()
    free = _hf_greedy(model, ids, mask, 12)[:, ids.shape[1]:]
    second = int(free[0, 4])
    first = next(t for t in range(2, 512) if t not in set(free.flatten().tolist()))  # never emitted
    model.generation_config.eos_token_id = [first, second]
    ends = stop_ids(model)
    assert ends == [first, second]
    out = sample(model, ids, mask, 12, do_sample=False, pad_token_id=PAD, eos_token_id=ends)
    row = free[0].tolist()
    stop = row.index(second) + 1
    assert out.response_mask[0, ids.shape[1]:].sum() == stop  # ended at (and including) the second id
    assert out.sequences[0, ids.shape[1] + stop:].eq(PAD).all()
    assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 12, eos=ends))
    # with only the first id the row runs on past the second
    alone = sample(model, ids, mask, 12, do_sample=False, pad_token_id=PAD, eos_token_id=first)
    assert alone.response_mask[0, ids.shape[1]:].sum() == 12


def test_a_longer_static_cache_changes_nothing(monkeypatch):
    """Compiled decoding rounds the cache length up (CACHE_BUCKET); the extra positions are
    causally masked, so greedy tokens stay those of generate."""
    import cbd_ray.generate as G

    monkeypatch.setattr(G, "_cache_len", lambda max_len, models, bucket: max_len + 13)
    for family in ("gpt2", "llama"):
        model = _model(family)
        ids, mask = _prompts()
        out = sample(model, ids, mask, 10, do_sample=False, pad_token_id=PAD)
        assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 10))
    assert G._cache_len.__name__ == "<lambda>"
    monkeypatch.undo()
    assert G._cache_len(70, [_model("gpt2")], 64) == 128 and G._cache_len(10, [], 1) == 10
    assert G._cache_len(1000, [_model("gpt2")], 64) == max(1000, G._max_positions(_model("gpt2")))


def test_compile_is_auto_by_device():
    from types import SimpleNamespace

    from cbd_ray.generate import _use_compile

    model = _model("gpt2")
    dev = lambda kind: SimpleNamespace(type=kind)  # noqa: E731 (torch.device("npu") needs torch-npu)
    assert _use_compile(None, dev("cpu"), [model]) is False
    assert _use_compile(None, dev("cuda"), [model]) is True
    assert _use_compile(None, dev("npu"), [model]) is True
    assert _use_compile(True, dev("cpu"), [model]) is False  # ignored, with a warning
    assert _use_compile(False, dev("cuda"), [model]) is False
    next(model.parameters()).ds_id = 0  # DeepSpeed ZeRO-3 marks its partitioned parameters
    assert _use_compile(None, dev("cuda"), [model]) is False


@pytest.mark.parametrize("auto", [True, False])
def test_a_failing_compiled_step_falls_back_to_eager_only_in_auto_mode(monkeypatch, auto, caplog):
    """The fake compiled call writes the cache (as a real step would) and then fails; in auto
    mode the step is rerun eagerly from the restored cache and the result is unchanged."""
    import cbd_ray.generate as G

    model = _model("gpt2")
    ids, mask = _prompts()
    ref = sample(model, ids, mask, 8, do_sample=False, pad_token_id=PAD).sequences

    def broken(**kw):
        model(**kw)
        raise RuntimeError("no graph today")

    monkeypatch.setattr(G, "_use_compile", lambda compile, device, models: True)
    monkeypatch.setattr(G, "_compile_config", lambda device_type: "fake")
    monkeypatch.setattr(model, "get_compiled_call", lambda cfg: broken, raising=False)
    if auto:
        with caplog.at_level("WARNING", logger="cbd_ray.generate"):
            out = sample(model, ids, mask, 8, do_sample=False, pad_token_id=PAD, compile=None)
        assert torch.equal(out.sequences, ref)
        assert "decoding eagerly" in caplog.text
        cache = model.__dict__["_cbd_static_cache"][2]  # the prompt and 7 fed tokens, none twice
        assert all(int(layer.cumulative_length) == ids.shape[1] + 7 for layer in cache.layers)
        caplog.clear()  # later auto-mode calls do not try again
        with caplog.at_level("WARNING", logger="cbd_ray.generate"):
            assert torch.equal(sample(model, ids, mask, 8, do_sample=False, pad_token_id=PAD).sequences, ref)
        assert "decoding eagerly" not in caplog.text
    else:
        with pytest.raises(RuntimeError, match="no graph today"):
            sample(model, ids, mask, 8, do_sample=False, pad_token_id=PAD, compile=True)


def test_compiled_decoding_reuses_one_held_cache_across_prompt_widths(monkeypatch):
    """With compiled decoding (faked here by the eager call) the static cache stays on the model
    and serves every later call it is long enough for: a new cache would mean a recompile."""
    import cbd_ray.generate as G

    model = _model("gpt2")
    monkeypatch.setattr(G, "_use_compile", lambda compile, device, models: True)
    monkeypatch.setattr(G, "_compile_config", lambda device_type: "fake")
    monkeypatch.setattr(model, "get_compiled_call", lambda cfg: model.__call__, raising=False)
    caches = []
    for p, n in ((9, 10), (20, 30), (9, 5), (40, 40)):
        ids, mask = _prompts(p=p, seed=p)
        out = sample(model, ids, mask, n, do_sample=False, pad_token_id=PAD, compile=True)
        assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, n))
        caches.append(model.__dict__["_cbd_static_cache"])
    assert caches[0][1] == 64 and caches[0][2] is caches[1][2] is caches[2][2]  # 19, 50, 14 fit in 64
    assert caches[3][1] == 128 and caches[3][2] is not caches[0][2]  # 80 positions: one larger cache
