"""Aligned blending: the small anchor's heads, FFN neurons and hidden channels are permuted
to match the large anchor resized to the target. The permutation changes no function, finds
a planted permutation exactly, and is recorded in cbd.json; ``align: auto`` leaves a pruned
descendant alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cbd_ray.align import align_to, descends_from, resolve_align, write_lineage
from cbd_ray.errors import CBDError
from cbd_ray.interpolate import AnchorPair, Shape
from cbd_ray.tiny import FAMILIES
from anchor_models import logits, mid_shape, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_small_anchor_computes_the_same_function(anchors, family, tmp_path):
    s, l = anchors[family]
    rec = align_to(s, l, mid_shape(family), tmp_path / "aligned")
    assert rec["applied"] and rec["hidden"]["moved"] > 0 and rec["ffn"]["moved"] > 0
    assert rec["hidden"]["corr_after"] >= rec["hidden"]["corr_before"]
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(tmp_path / "aligned", ids), logits(s, ids), atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "aligned" / "cbd.json").read_text())
    assert meta["align"]["hidden"]["moved"] == rec["hidden"]["moved"]


def _permute_gpt2(src: Path, out: Path, seed: int) -> None:
    """A copy of a GPT-2 model with hidden channels, heads and FFN neurons shuffled (the
    same function, unrelated channel order), written by hand from the tensor layout."""
    shutil.copytree(src, out)
    w = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    h = torch.randperm(32, generator=g)
    new = {}
    for k, t in w.items():
        if k in ("transformer.wte.weight", "transformer.wpe.weight"):
            t = t[:, h]
        elif k.endswith(("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "ln_f.weight", "ln_f.bias",
                         "attn.c_proj.bias", "mlp.c_proj.bias")):
            t = t[h]
        new[k] = t
    for j in range(2):
        p = f"transformer.h.{j}."
        heads = torch.randperm(4, generator=g)
        cols = torch.cat([torch.arange(8) + 8 * int(i) for i in heads])
        qkv = torch.cat([cols, cols + 32, cols + 64])
        f = torch.randperm(64, generator=g)
        new[p + "attn.c_attn.weight"] = w[p + "attn.c_attn.weight"][h][:, qkv]
        new[p + "attn.c_attn.bias"] = w[p + "attn.c_attn.bias"][qkv]
        new[p + "attn.c_proj.weight"] = w[p + "attn.c_proj.weight"][cols][:, h]
        new[p + "mlp.c_fc.weight"] = w[p + "mlp.c_fc.weight"][h][:, f]
        new[p + "mlp.c_fc.bias"] = w[p + "mlp.c_fc.bias"][f]
        new[p + "mlp.c_proj.weight"] = w[p + "mlp.c_proj.weight"][f][:, h]
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def test_a_planted_permutation_is_undone_exactly(anchors, tmp_path):
    s, _ = anchors["gpt2"]
    shuffled = tmp_path / "shuffled"
    _permute_gpt2(s, shuffled, seed=5)
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(shuffled, ids), logits(s, ids), atol=1e-5, rtol=1e-5)  # the planting is exact
    rec = align_to(shuffled, s, None, tmp_path / "back")  # match to the original (same shape)
    assert rec["hidden"]["corr_after"] == pytest.approx(1.0) and rec["ffn"]["corr_after"] == pytest.approx(1.0)
    assert rec["heads"]["corr_after"] == pytest.approx(1.0)
    back, orig = weights(tmp_path / "back"), weights(s)
    assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_pair_blends_the_aligned_anchor_and_records_it(anchors, tmp_path):
    s, l = anchors["llama"]
    t = mid_shape("llama")
    on = AnchorPair(s, l, align="on").make(t, tmp_path / "on", alpha=0.5)
    off = AnchorPair(s, l, align="off").make(t, tmp_path / "off", alpha=0.5)
    meta_on = json.loads((tmp_path / "on" / "cbd.json").read_text())
    meta_off = json.loads((tmp_path / "off" / "cbd.json").read_text())
    assert on["aligned"] and meta_on["align"]["applied"] and meta_on["align"]["mode"] == "on"
    assert not off["aligned"] and meta_off["align"] == {"mode": "off", "applied": False}
    a, b = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # α = 1 and α = 0 use one anchor only: nothing to align, the anchor resized bit for bit
    one = AnchorPair(s, l, align="on").make(t, tmp_path / "one", alpha=1.0)
    assert not one["aligned"]
    with pytest.raises(CBDError, match="align='sometimes'"):
        AnchorPair(s, l, align="sometimes")


def test_auto_aligns_only_pairs_that_do_not_descend(anchors, tmp_path):
    s, l = anchors["gpt2"]
    assert resolve_align("auto", s, l) and not resolve_align("off", s, l) and resolve_align("on", s, l)
    child = tmp_path / "child"
    shutil.copytree(s, child)
    write_lineage(child, student_dir=l)
    assert descends_from(child, l) and not resolve_align("auto", child, l)
    grandchild = tmp_path / "grandchild"
    shutil.copytree(s, grandchild)
    (grandchild / "model.safetensors").write_bytes((child / "model.safetensors").read_bytes())
    write_lineage(grandchild, student_dir=child)
    assert descends_from(grandchild, l) and descends_from(grandchild, child)
    assert not descends_from(l, s)


def test_alignment_sweep_scores_each_alpha_with_and_without(anchors, tmp_path):
    from cbd_ray.reproduce import alignment_sweep
    from cbd_ray.tiny import builtin_text

    s, l = anchors["gpt2"]
    text = tmp_path / "val.txt"
    text.write_text(builtin_text()[:8000])
    t = mid_shape("gpt2")
    pairs = [{"name": "p", "small": s, "large": l, "targets": [{"name": "t", "shape": t.as_dict()}]}]
    rows = alignment_sweep(pairs, text, tmp_path / "out", alphas=(0.5, 1.0), windows=4, seq_len=16, log=lambda m: None)
    assert [(r["align"], r["alpha"]) for r in rows] == [("off", 0.5), ("off", 1.0), ("on", 0.5), ("on", 1.0)]
    by = {(r["align"], r["alpha"]): r for r in rows}
    assert by[("on", 0.5)]["aligned"] and not by[("off", 0.5)]["aligned"]
    assert by[("on", 1.0)]["loss"] == by[("off", 1.0)]["loss"]  # one anchor only: nothing to align
    assert by[("on", 0.5)]["loss"] != by[("off", 0.5)]["loss"]
    assert (tmp_path / "out" / "alignment_sweep.png").stat().st_size > 1000
    assert not (tmp_path / "out" / ".scratch").exists()


def test_a_pruned_copy_is_placed_at_the_slots_its_channels_hold_in_the_resized_large(anchors, tmp_path):
    """The small anchor cut from the large one (channels S_s) must land where the large
    anchor resized to the target keeps those channels (S_t ⊇ S_s), not at slots 0..n-1."""
    from cbd_ray.interpolate import resize_model

    _, l = anchors["gpt2"]
    small = tmp_path / "small"
    resize_model(l, Shape(2, 32, 4, None, 64), small)
    t = mid_shape("gpt2")
    resize_model(l, t, tmp_path / "tl")
    pair = AnchorPair(small, l, align="on")
    pair.make(t, tmp_path / "mix", alpha=0.5)
    rec = json.loads((tmp_path / "mix" / "cbd.json").read_text())["align"]
    assert rec["hidden"]["corr_after"] == pytest.approx(1.0, abs=1e-4) and rec["hidden"]["corr_before"] < 0.9
    mix, tl, sm = (weights(d)["transformer.wte.weight"] for d in (tmp_path / "mix", tmp_path / "tl", small))
    # every small channel equals a resized-large column; after alignment the blend there is that column
    same = [j for j in range(48) if torch.allclose(mix[:, j], tl[:, j])]
    half = [j for j in range(48) if torch.allclose(mix[:, j], 0.5 * tl[:, j])]
    assert len(same) == 32 and len(half) == 16
    assert all(any(torch.equal(tl[:, j], sm[:, i]) for i in range(32)) for j in same)
