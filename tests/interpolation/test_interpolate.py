"""Interpolation between two anchors: the α endpoints return the anchors bit for bit, the
blend is exactly α·T(S) + (1−α)·T(L), outputs are complete Hugging Face directories with
provenance, and every bad input is refused before any work."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from anchor_models import large_shape, mid_shape, save, small_shape, weights
from cbd_ray.errors import CBDError, CheckpointError, IncompatibleModelsError
from cbd_ray.interpolate import AnchorPair, ResizeOptions, Shape, interpolate, parse_shape, resize_model
from cbd_ray.resize import Checkpoint
from cbd_ray.storage import file_sha256
from cbd_ray.tiny import FAMILIES, builtin_text


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_returns_small_and_alpha_zero_returns_large_bit_for_bit(anchors, family, tmp_path):
    s, l = anchors[family]
    pair = AnchorPair(s, l)
    pair.make(small_shape(family), tmp_path / "s", alpha=1.0)
    pair.make(large_shape(family), tmp_path / "l", alpha=0)
    for src, out in ((s, "s"), (l, "l")):
        a, b = weights(src), weights(tmp_path / out)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (family, out, k)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_loads_generates_and_records_its_provenance(anchors, family, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, l = anchors[family]
    pair = AnchorPair(s, l)
    rec = pair.make(mid_shape(family), tmp_path / "mid")
    assert set(rec) >= {"name", "shape", "params", "alpha", "seconds", "path"}
    model, info = AutoModelForCausalLM.from_pretrained(rec["path"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(p.numel() for p in model.parameters()) == rec["params"] == pair.params_of(mid_shape(family))
    tok = AutoTokenizer.from_pretrained(rec["path"])
    assert len(tok) == len(tokenizer)
    ids = tok("import os", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 4)
    meta = json.loads((tmp_path / "mid/cbd.json").read_text())
    assert meta["anchors"]["small"]["weights"]["model.safetensors"] == file_sha256(s / "model.safetensors")
    assert meta["anchors"]["large"]["weights"]["model.safetensors"] == file_sha256(l / "model.safetensors")
    assert meta["target"] == mid_shape(family).as_dict() and meta["params"] == rec["params"]
    assert meta["alpha"] == pytest.approx(pair.auto_alpha(mid_shape(family))) == rec["alpha"]
    assert meta["resize"]["width_expand"] == "zero" and meta["cbd_ray_version"]
    card = (tmp_path / "mid/README.md").read_text()
    assert f"{rec['params']:,}" in card and "from_pretrained" in card
    assert (tmp_path / "mid/generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("family,expand", [("gpt2", "zero"), ("qwen2", "zero"), ("gpt_neox", "copy")])
def test_blend_is_alpha_weighted_sum_of_resized_anchors(anchors, family, expand, tmp_path):
    s, l = anchors[family]
    t = mid_shape(family)
    opts = ResizeOptions(width_expand=expand, layer_expand="identity")
    interpolate(s, l, t, tmp_path / "mix", alpha=0.25, resize=opts, align="off")  # the plain formula
    resize_model(s, t, tmp_path / "ts", resize=opts)
    resize_model(l, t, tmp_path / "tl", resize=opts)
    mix, ts, tl = weights(tmp_path / "mix"), weights(tmp_path / "ts"), weights(tmp_path / "tl")
    for k in mix:
        torch.testing.assert_close(mix[k], 0.25 * ts[k] + 0.75 * tl[k], atol=1e-6, rtol=1e-6)


def test_per_layer_alpha_schedule_and_auto_alpha(anchors, tmp_path):
    s, l = anchors["llama"]
    pair = AnchorPair(s, l, align="off")  # the plain formula, no permutation
    t = mid_shape("llama")
    p_t = pair.params_of(t)
    assert pair.auto_alpha(t) == pytest.approx((pair.large_params - p_t) / (pair.large_params - pair.small_params))
    assert pair.auto_alpha(small_shape("llama")) == 1.0 and pair.auto_alpha(large_shape("llama")) == 0.0
    rec = pair.make(t, tmp_path / "sched", alpha=[1.0, 0.0, 0.5])
    assert rec["alpha"] == [1.0, 0.0, 0.5]
    resize_model(s, t, tmp_path / "ts")
    resize_model(l, t, tmp_path / "tl")
    mix, ts, tl = weights(tmp_path / "sched"), weights(tmp_path / "ts"), weights(tmp_path / "tl")
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(mix[name.format(0)], ts[name.format(0)])
    assert torch.equal(mix[name.format(1)], tl[name.format(1)])
    torch.testing.assert_close(mix[name.format(2)], 0.5 * ts[name.format(2)] + 0.5 * tl[name.format(2)])
    # outside the layers: the schedule's mean
    torch.testing.assert_close(mix["model.norm.weight"], 0.5 * ts["model.norm.weight"] + 0.5 * tl["model.norm.weight"])


def test_calibrated_interpolation_is_deterministic_and_never_loads_models_without_calib(anchors, tmp_path, monkeypatch):
    s, l = anchors["gpt_neox"]
    texts = [p for p in builtin_text().split("\n\n") if len(p) > 200][:30]
    r1 = interpolate(s, l, mid_shape("gpt_neox"), tmp_path / "a", resize=ResizeOptions(calib_texts=texts))
    r2 = interpolate(s, l, mid_shape("gpt_neox"), tmp_path / "b", resize=ResizeOptions(calib_texts=texts))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a/cbd.json").read_text())
    assert meta["resize"]["width_subset"] == "importance" and meta["resize"]["calib"]["texts"] == 30
    assert r1["params"] == r2["params"]
    # without calibration nothing instantiates a model: tensors stream from safetensors
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a full model was instantiated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    interpolate(s, l, mid_shape("gpt_neox"), tmp_path / "c")


def test_existing_output_is_reused_refused_or_overwritten(anchors, tmp_path):
    s, l = anchors["gpt2"]
    pair = AnchorPair(s, l)
    t = mid_shape("gpt2")
    first = pair.make(t, tmp_path / "t", alpha=0.5)
    again = pair.make(t, tmp_path / "t", alpha=0.5)
    assert again["reused"] and again["params"] == first["params"]
    with pytest.raises(FileExistsError, match="different model"):
        pair.make(t, tmp_path / "t", alpha=0.7)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        pair.make(t, other)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(CBDError, match="is the large anchor itself"):
        pair.make(t, l, overwrite=True)
    rec = pair.make(t, tmp_path / "t", alpha=0.7, overwrite=True)
    assert rec["alpha"] == 0.7 and json.loads((tmp_path / "t/cbd.json").read_text())["alpha"] == 0.7


def test_a_crash_leaves_nothing_that_looks_whole(anchors, tmp_path, monkeypatch):
    import cbd_ray.model_writer as I

    s, l = anchors["llama"]
    pair = AnchorPair(s, l)
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return real(*a, **k)

    real = I.resize_tensor
    monkeypatch.setattr(I, "resize_tensor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pair.make(mid_shape("llama"), tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_bad_targets_and_alphas_are_refused_before_work(anchors, tmp_path):
    s, l = anchors["llama"]
    pair = AnchorPair(s, l)
    out = tmp_path / "never"
    cases = [
        (Shape(5, 48, 6, 3, 96), 0.5, r"layers=5 is outside the anchors' range \[2, 4\].*small 2x32x4/kv2/ffn64"),
        (Shape(3, 80, 10, 5, 96), 0.5, "hidden=80 is outside"),
        (Shape(3, 48, 5, 5, 96), 0.5, "heads=5 does not divide hidden=48"),
        (Shape(3, 48, 6, 4, 96), 0.5, "kv_heads=4 does not divide heads=6"),
        (Shape(3, 48, 6, 3, 200), 0.5, "ffn=200 is outside"),
        (Shape(3, 48, 6, 3, 96), 1.5, r"alpha=1.5 is outside \[0, 1\]"),
        (Shape(3, 48, 6, 3, 96), -0.1, "outside"),
        (Shape(3, 48, 6, 3, 96), "half", "alpha='half'"),
        (Shape(3, 48, 6, 3, 96), [0.5, 0.5], "schedule has 2 values; the target has 3 layers"),
        (Shape(3, 48, 6, 3, 96), [0.5, 2.0, 0.5], "outside"),
    ]
    for shape, alpha, msg in cases:
        with pytest.raises(CBDError, match=msg):
            pair.make(shape, out, alpha=alpha)
    assert not out.exists()
    gpt2 = AnchorPair(*anchors["gpt2"])
    with pytest.raises(CBDError, match="no grouped-query attention"):
        gpt2.validate_target(Shape(3, 48, 6, 2, 96), 0.5)
    # kv_heads and ffn defaults keep the anchors' group size and ffn/hidden ratio
    assert pair.validate_target(Shape(3, 48, 6), "auto") == Shape(3, 48, 6, 3, 96)


def test_target_outside_the_anchors_parameter_range_is_refused(tmp_path, tokenizer):
    # deep-narrow small anchor and shallow-wide large one: 2 layers x 32 is inside every
    # axis range but smaller than both
    s = save(tmp_path, "gpt2", Shape(4, 32, 4, None, 64), tokenizer, 1, "deep")
    l = save(tmp_path, "gpt2", Shape(2, 64, 8, None, 128), tokenizer, 2, "wide")
    pair = AnchorPair(s, l)
    with pytest.raises(CBDError, match="parameters, outside the anchors' range"):
        pair.validate_target(Shape(2, 32, 4, None, 64), "auto")


def test_incompatible_anchors_say_to_bridge_first(anchors, tmp_path, tokenizer):
    with pytest.raises(IncompatibleModelsError, match="different families.*bridge first"):
        AnchorPair(anchors["gpt2"][0], anchors["llama"][1])
    with pytest.raises(IncompatibleModelsError, match="different families"):
        AnchorPair(anchors["llama"][0], anchors["qwen2"][1])
    from cbd_ray.tiny import save_tiny_model

    other_vocab = save_tiny_model(tmp_path / "v", "gpt2", None, seed=3, layers=4, hidden=64, heads=8, ffn=128, vocab_size=300)
    with pytest.raises(IncompatibleModelsError, match="different vocabularies.*bridge first"):
        AnchorPair(anchors["gpt2"][0], other_vocab)
    hd16 = save_tiny_model(tmp_path / "hd", "gpt2", tokenizer, seed=3, layers=4, hidden=64, heads=4, ffn=128)
    with pytest.raises(CBDError, match="different head_dim"):
        AnchorPair(anchors["gpt2"][0], hd16)


def test_missing_or_corrupt_checkpoints_are_clear_errors(anchors, tmp_path):
    s, l = anchors["qwen3"]

    def copy(name):
        d = tmp_path / name
        shutil.copytree(l, d)
        return d

    with pytest.raises(CheckpointError, match="is not a directory"):
        AnchorPair(s, tmp_path / "nowhere")
    d = copy("noconfig")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        AnchorPair(s, d)
    d = copy("badheader")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="header of model.safetensors is unreadable"):
        AnchorPair(s, d)
    d = copy("truncated")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        AnchorPair(s, d)
    d = copy("pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        AnchorPair(s, d)
    d = copy("missing")
    from safetensors.torch import load_file, save_file

    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.1.self_attn.k_norm.weight"]
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_norm.weight is missing"):
        AnchorPair(s, d)
    d = copy("unknown")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CBDError, match="MambaForCausalLM.*not supported.*GPT2LMHeadModel"):
        AnchorPair(s, d)


def test_parse_shape_accepts_three_spellings_and_refuses_bad_ones():
    assert parse_shape("14x768x12") == Shape(14, 768, 12)
    assert parse_shape("4x64x8x2x256") == Shape(4, 64, 8, 2, 256)
    assert parse_shape("layers=14, hidden=768,heads=12,ffn=3072") == Shape(14, 768, 12, None, 3072)
    assert parse_shape({"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2}) == Shape(2, 32, 4, 2)
    for bad, msg in (("14x768", "expected"), ("layers=2,hidden=32", "missing heads"), ("2xax4", "not an integer"),
                     ({"layers": 2, "hidden": 32, "heads": 4, "depth": 3}, "unknown field"), ("0x32x4", "positive")):
        with pytest.raises(CBDError, match=msg):
            parse_shape(bad)


def test_hub_style_gpt2_names_and_extra_buffers_are_read(anchors, tmp_path):
    """Hub GPT-2 checkpoints drop the ``transformer.`` prefix and carry attention-mask
    buffers; the reader finds every tensor under either name and ignores the extras."""
    from safetensors.torch import load_file, save_file

    s, l = anchors["gpt2"]
    hub = tmp_path / "hub-large"
    shutil.copytree(l, hub)
    w = load_file(str(hub / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in w.items()}
    renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(renamed, str(hub / "model.safetensors"), metadata={"format": "pt"})
    t = mid_shape("gpt2")
    interpolate(s, l, t, tmp_path / "a", alpha=0.3)
    interpolate(s, hub, t, tmp_path / "b", alpha=0.3)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_pair_makes_the_same_bytes_again_so_the_anchors_stay_untouched(anchors, family, tmp_path):
    """The blend works in place on fresh buffers only: the anchors' memory-mapped tensors
    are never written, so a second target from the same pair equals the first."""
    s, l = anchors[family]
    pair = AnchorPair(s, l)
    for shape in (mid_shape(family), large_shape(family), small_shape(family)):
        pair.make(shape, tmp_path / "a", alpha=0.5, overwrite=True)
        pair.make(shape, tmp_path / "b", alpha=0.5, overwrite=True)
        fresh = tmp_path / "c"
        interpolate(s, l, shape, fresh, alpha=0.5, overwrite=True)
        raw = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("a", "b", "c")]
        assert raw[0] == raw[1] == raw[2], shape
    assert weights(s).keys() == weights(tmp_path / "a").keys()
    for k, v in weights(s).items():
        assert torch.equal(v, Checkpoint(s).get(k)) and torch.equal(v, pair.small.get(k)), k


def test_bf16_and_sharded_anchors(tmp_path, tokenizer):
    """bf16 weights stay bf16 (blended in float32), and anchors saved in several shards
    (model.safetensors.index.json) read like single files."""
    from transformers import AutoModelForCausalLM

    from cbd_ray.tiny import make_tiny_model

    dirs = []
    for seed, shape in ((1, small_shape("qwen3")), (2, large_shape("qwen3"))):
        m = make_tiny_model("qwen3", seed=seed, vocab_size=len(tokenizer), layers=shape.layers, hidden=shape.hidden,
                            heads=shape.heads, kv_heads=shape.kv_heads, ffn=shape.ffn).to(torch.bfloat16)
        d = tmp_path / f"bf16-{seed}"
        m.save_pretrained(d, max_shard_size="40KB")
        tokenizer.save_pretrained(d)
        dirs.append(d)
    assert (dirs[1] / "model.safetensors.index.json").is_file()
    pair = AnchorPair(*dirs)
    rec = pair.make(mid_shape("qwen3"), tmp_path / "mid", alpha=0.5)
    out = weights(tmp_path / "mid")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(rec["path"])
    assert sum(p.numel() for p in model.parameters()) == rec["params"]
    pair.make(small_shape("qwen3"), tmp_path / "s", alpha=1.0)
    src = AutoModelForCausalLM.from_pretrained(dirs[0]).state_dict()
    for k, v in weights(tmp_path / "s").items():
        assert torch.equal(v, src[k]), k


def test_large_outputs_are_sharded_and_load_the_same(anchors, tmp_path, monkeypatch):
    import cbd_ray.model_writer as W
    from transformers import AutoModelForCausalLM

    s, l = anchors["llama"]
    pair = AnchorPair(s, l)
    pair.make(mid_shape("llama"), tmp_path / "one", alpha=0.4)
    monkeypatch.setattr(W, "MAX_SHARD_BYTES", 40_000)
    pair.make(mid_shape("llama"), tmp_path / "many", alpha=0.4)
    index = json.loads((tmp_path / "many/model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "many/model.safetensors").exists()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    many = AutoModelForCausalLM.from_pretrained(tmp_path / "many").state_dict()
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    # a sharded output serves as an anchor of its own
    assert AnchorPair(s, tmp_path / "many").large_shape == mid_shape("llama")
