"""Instruction data: the paper's template, response-only loss masks, truncation, bad
records, packing, vocabulary checks (plain Python, no Ray)."""
from __future__ import annotations

import json

import pytest

from cbd_ray.data import (PROMPT_NO_INPUT, check_vocab, collate, encode_instruction, encode_records,
                          left_padded_prompts, pack_text, read_instructions, render_prompt)
from cbd_ray.errors import CBDError, IncompatibleModelsError


def test_template_renders_the_paper_prompt_exactly():
    assert render_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert render_prompt("Summarise.", "Ray is a framework.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise.\n\n"
        "### Input:\nRay is a framework.\n\n### Response:\n")
    assert render_prompt("Name a colour.", "   ") == PROMPT_NO_INPUT.format(instruction="Name a colour.")


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    rec = {"instruction": "Say hi.", "context": "", "response": "Hello there."}
    row = encode_instruction(tokenizer, rec, max_len=256)
    prompt_ids = tokenizer(render_prompt("Say hi."))["input_ids"]
    resp_ids = tokenizer("Hello there.")["input_ids"]
    assert row["input_ids"] == prompt_ids + resp_ids + [tokenizer.eos_token_id]
    assert row["loss_mask"] == [0] * len(prompt_ids) + [1] * (len(resp_ids) + 1)
    assert row["prompt_length"] == len(prompt_ids) and not row["truncated"]


def test_long_records_are_truncated_and_counted_or_refused(tokenizer, shared_data, caplog):
    recs = read_instructions(shared_data / "dolly/dolly_eval.jsonl", limit=40)
    lengths = [encode_instruction(tokenizer, r, 10_000)["length"] for r in recs]
    max_len = sorted(lengths)[len(lengths) // 2]  # about half the records are longer
    expected = sum(n > max_len for n in lengths)
    assert 0 < expected < len(recs)
    with caplog.at_level("WARNING", logger="cbd_ray.data"):
        rows = encode_records(tokenizer, recs, max_len)
    assert sum(r["truncated"] for r in rows) == expected
    assert f"truncated {expected} of {len(recs)}" in caplog.text
    assert all(r["length"] <= max_len for r in rows)
    # a cut row keeps the end of its prompt ("### Response:") and some response
    cut = next(r for r in rows if r["truncated"])
    assert sum(cut["loss_mask"]) >= 1
    assert tokenizer.decode(cut["input_ids"][: cut["prompt_length"]]).endswith("### Response:\n")
    with pytest.raises(CBDError, match=f"exceeds max_len={max_len}"):
        encode_records(tokenizer, recs, max_len, on_overflow="error")


def test_missing_field_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [{"instruction": "a", "context": "", "response": "b"}, {"instruction": "c", "context": ""}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(CBDError, match=r"bad.jsonl:2: record is missing field 'response'"):
        read_instructions(p)
    assert read_instructions(p, require_response=False)[1] == {"instruction": "c", "context": ""}
    p.write_text('{"instruction": "a", "response": "b"}\nnot json\n')
    with pytest.raises(CBDError, match=r"bad.jsonl:2: not valid JSON"):
        read_instructions(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_instructions(tmp_path / "nope.jsonl")


def test_parquet_and_jsonl_give_the_same_records(tmp_path, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = read_instructions(shared_data / "dolly/dolly_eval.jsonl", limit=5)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    assert read_instructions(tmp_path / "d.parquet") == recs
    assert {"instruction", "context", "response", "category"} == set(recs[0])


def test_prompts_over_max_prompt_len_are_dropped_not_cut(tokenizer, tmp_path):
    """LMOps drops a prompt over --max-prompt-length (cutting it from the left would lose the
    template's header): the plain encoder drops it; the Ray Data actor's callable marks its
    row dropped (a batch keeps its size) and the driver leaves those rows out and counts them."""
    import numpy as np
    import pyarrow as pa

    from cbd_ray.data import TokenizeBatch, kept_rows

    recs = [{"instruction": "Say hi.", "context": ""}, {"instruction": "word " * 300, "context": ""},
            {"instruction": "Name a colour.", "context": ""}]
    short = len(tokenizer(render_prompt("Say hi."), add_special_tokens=False)["input_ids"])
    assert encode_instruction(tokenizer, recs[1], 512, with_response=False, max_prompt_len=100) is None
    row = encode_instruction(tokenizer, recs[0], 512, with_response=False, max_prompt_len=100)
    assert row["prompt_length"] == short and row["input_ids"][:3] == tokenizer("Below")["input_ids"][:3]
    assert encode_instruction(tokenizer, recs[1], 512, with_response=False)["truncated"]  # no limit: cut, as before
    assert len(encode_records(tokenizer, recs, 512, with_response=False, max_prompt_len=100)) == 2
    tokenizer.save_pretrained(tmp_path / "tok")
    actor = TokenizeBatch(str(tmp_path / "tok"), 512, with_response=False, max_prompt_len=100)
    batch = {"instruction": np.array([r["instruction"] for r in recs]), "idx": np.array([7, 8, 9])}
    out = actor(batch)
    assert out["dropped"].tolist() == [0, 1, 0] and out["length"][1] == 0 and actor.dropped == 1
    assert out["input_ids"].shape == (3, 512) and out["prompt_length"].tolist()[0] == short
    table = pa.table({k: (list(v) if v.ndim > 1 else v) for k, v in out.items()})
    kept, n = kept_rows(table)
    assert n == 1 and kept["idx"].to_pylist() == [7, 9] and "dropped" not in kept.column_names
    assert kept_rows(kept) == (kept, 0)


def test_collate_and_left_padded_prompts(tokenizer):
    recs = [{"instruction": "Say hi.", "context": "", "response": "Hello."},
            {"instruction": "Name three colours please.", "context": "Art", "response": "Red, blue, green."}]
    rows = encode_records(tokenizer, recs, 256)
    b = collate(rows, tokenizer.pad_token_id)
    assert b["input_ids"].shape == (2, max(r["length"] for r in rows))
    assert b["attention_mask"].sum(1).tolist() == [r["length"] for r in rows]
    ids, attn = left_padded_prompts(b, tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        n = r["prompt_length"]
        assert ids[i, -n:].tolist() == r["input_ids"][:n] and int(attn[i].sum()) == n


def test_pack_text_makes_full_blocks_with_eos_between_documents(tokenizer):
    docs = ["first document " * 20, "second one " * 30]
    blocks = pack_text(tokenizer, docs, 16)
    flat = sum((tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs), [])
    assert blocks.shape == (len(flat) // 16, 16)
    assert blocks.flatten().tolist() == flat[: blocks.numel()]


def test_vocab_padding_uses_the_shared_size_and_other_tokenizers_are_refused(tokenizer, gpt2_tokenizer):
    from transformers import Qwen2Config

    # one tokenizer, embedding rows rounded up differently (as Qwen's 151936 vs 152064)
    a, b = Qwen2Config(vocab_size=151936), Qwen2Config(vocab_size=152064)
    big = type("Tok", (), {"__len__": lambda self: 151665, "convert_tokens_to_ids": None})()
    assert check_vocab(b, a, big, big) == 151936
    # without tokenizers, the larger size must still fit in the shared one
    with pytest.raises(IncompatibleModelsError, match="differ by more than padding"):
        check_vocab(a, b)
    # truly different tokenizers: refused with a pointer to SeqKD / the bridge
    with pytest.raises(IncompatibleModelsError, match="seqkd"):
        check_vocab(Qwen2Config(vocab_size=50257), Qwen2Config(vocab_size=512), gpt2_tokenizer, tokenizer)
    with pytest.raises(IncompatibleModelsError, match="bridge"):
        check_vocab(Qwen2Config(vocab_size=512), Qwen2Config(vocab_size=600), tokenizer, gpt2_tokenizer)
