"""Per-axis resizing: own shape is the identity, copy expansion and identity-inserted
layers keep the function, zero padding keeps padded slots zero, importance is deterministic."""
from __future__ import annotations


import pytest
import torch

from anchor_models import GQA, large_shape, logits, make_anchors, small_shape, weights
from cbd_ray.arch import adapter_for
from cbd_ray.errors import CBDError
from cbd_ray.interpolate import ResizeOptions, Shape, resize_model
from cbd_ray.resize import AxisMap, Checkpoint, Scorer, choose, head_maps, layer_map, plan_resize
from cbd_ray.tiny import FAMILIES, builtin_text

CALIB = [p for p in builtin_text().split("\n\n") if len(p) > 200][:40]


@pytest.fixture(scope="module")
def anchors(tmp_path_factory, tokenizer):
    return make_anchors(tmp_path_factory.mktemp("anchors"), tokenizer)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor([tokenizer("def resize(model, shape): return the same function")["input_ids"]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["magnitude", "first"])
def test_resize_to_own_shape_is_the_identity(anchors, family, mode, tmp_path):
    src = anchors[family][1]
    resize_model(src, large_shape(family), tmp_path / "same", resize=ResizeOptions(width_subset=mode))
    a, b = weights(src), weights(tmp_path / "same")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_expansion_and_identity_layers_keep_the_logits(anchors, family, ids, tmp_path):
    """hidden, heads, kv_heads, ffn x2 by copying with rescaling and 2 -> 4 layers by identity
    insertion: the wider, deeper model computes the same logits (atol 1e-5)."""
    src = anchors[family][0]
    target = Shape(4, 64, 8, 4 if family in GQA else None, 128)
    opts = ResizeOptions(width_expand="copy", layer_expand="identity")
    resize_model(src, target, tmp_path / "big", resize=opts)
    before, after = logits(src, ids), logits(tmp_path / "big", ids)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # the expansion really happened: the new model is larger and its inserted layers are zero-output
    w = weights(tmp_path / "big")
    a = adapter_for(Checkpoint(tmp_path / "big").config)
    assert a.param_count(target) > a.param_count(small_shape(family))
    outs = [s for s in a.stored() if s.residual_out]
    for s in outs:
        assert torch.count_nonzero(w[s.name_at(1)]) == 0 and torch.count_nonzero(w[s.name_at(3)]) == 0
        assert torch.count_nonzero(w[s.name_at(0)]) > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replicated_layers_are_copies_spread_evenly(anchors, family, tmp_path):
    src = anchors[family][0]
    s = small_shape(family)
    resize_model(src, Shape(5, s.hidden, s.heads, s.kv_heads, s.ffn), tmp_path / "deep")
    a, b = weights(src), weights(tmp_path / "deep")
    spec = next(x for x in adapter_for(Checkpoint(src).config).stored() if x.per_layer)
    # 2 -> 5 layers: source layers 0,0,0,1,1 (each repeated floor or ceil of 5/2 times, in order)
    for tgt, srcl in enumerate([0, 0, 0, 1, 1]):
        assert torch.equal(b[spec.name_at(tgt)], a[spec.name_at(srcl)])


def _padded(role: str, spec, n_small: dict, n_large: dict, hd: int) -> torch.Tensor:
    """Boolean mask over one axis: True where zero padding put a new slot."""
    if role == "hidden":
        return torch.arange(n_large["hidden"]) >= n_small["hidden"]
    if role == "ffn":
        return torch.arange(n_large["ffn"]) >= n_small["ffn"]
    if role in ("heads", "kv_heads") and spec.packing == "qkv_fused_conv1d":
        a_t, a_s = n_large["heads"] * hd, n_small["heads"] * hd
        return (torch.arange(3 * a_t) % a_t) >= a_s
    if role == "heads" and spec.packing == "qkv_interleaved":
        return torch.arange(3 * n_large["heads"] * hd) >= 3 * n_small["heads"] * hd
    if role in ("heads", "kv_heads"):
        return torch.arange(n_large[role] * hd) >= n_small[role] * hd
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_padding_leaves_padded_slots_zero_and_originals_in_place(anchors, family, tmp_path):
    src = anchors[family][0]
    S, L = small_shape(family), large_shape(family)
    target = Shape(S.layers, L.hidden, L.heads, L.kv_heads, L.ffn)
    resize_model(src, target, tmp_path / "wide", resize=ResizeOptions(width_expand="zero"))
    a, b = weights(src), weights(tmp_path / "wide")
    ad = adapter_for(Checkpoint(src).config)
    n_s = {"hidden": S.hidden, "heads": S.heads, "kv_heads": S.kv_heads or S.heads, "ffn": S.ffn}
    n_l = {"hidden": L.hidden, "heads": L.heads, "kv_heads": L.kv_heads or L.heads, "ffn": L.ffn}
    checked = 0
    for spec in ad.stored():
        for layer in range(S.layers) if spec.per_layer else [None]:
            name = spec.name_at(layer)
            t = b[name]
            keep = t
            for dim, role in enumerate(spec.axes):
                mask = _padded(role, spec, n_s, n_l, ad.head_dim)
                if mask is None:
                    continue
                assert torch.count_nonzero(t.index_select(dim, mask.nonzero().flatten())) == 0, (name, role)
                keep = keep.index_select(dim, (~mask).nonzero().flatten())
                checked += 1
            assert torch.equal(keep, a[name]), name
    assert checked > 10


def test_choose_subsets_by_score_with_ties_to_the_lower_index():
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.1])
    assert choose(5, 3, lambda: scores, "magnitude", "zero").index == (1, 2, 3)
    assert choose(5, 2, lambda: scores, "importance", "zero").index == (1, 3)
    assert choose(5, 2, lambda: scores, "first", "zero").index == (0, 1)
    assert choose(3, 5, None, "magnitude", "zero").index == (0, 1, 2, -1, -1)
    m = choose(3, 6, None, "magnitude", "copy")
    assert m.index == (0, 1, 2, 0, 1, 2) and m.copies == (2,) * 6
    assert AxisMap((1, -1), 2).rows(3) .index == (3, 4, 5, -1, -1, -1)


def test_gqa_head_maps_move_a_kv_head_with_its_query_group():
    # 8 query heads in 4 kv groups of 2; keep 2 kv heads -> the two groups with the largest sums
    scores = torch.tensor([1.0, 1.0, 9.0, 0.0, 0.0, 0.0, 5.0, 5.0])
    q, kv = head_maps(8, 4, 4, 2, lambda: scores, "magnitude", "zero")
    assert kv.index == (1, 3)
    assert q.index == (2, 3, 6, 7)
    # same kv heads, smaller groups: inside each group the better query head stays
    q, kv = head_maps(8, 4, 4, 4, lambda: scores, "magnitude", "zero")
    assert kv.index == (0, 1, 2, 3) and q.index == (0, 2, 4, 6)
    # expansion by copying keeps groups: the copied kv head brings copies of its queries
    q, kv = head_maps(4, 2, 8, 4, None, "magnitude", "copy")
    assert kv.index == (0, 1, 0, 1) and q.index == (0, 1, 2, 3, 0, 1, 2, 3)


def test_layer_maps():
    assert layer_map(6, 3, None, "uniform", "replicate") == [(0, False), (3, False), (5, False)]
    assert layer_map(4, 4, None, "uniform", "replicate") == [(i, False) for i in range(4)]
    assert layer_map(4, 2, lambda: torch.tensor([0.9, 0.1, 0.2, 0.8]), "importance", "replicate") == [(0, False), (3, False)]
    assert layer_map(2, 5, None, "uniform", "identity") == [(0, False), (0, True), (0, True), (1, False), (1, True)]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3"])
def test_activation_importance_is_deterministic_and_drives_the_subset(anchors, family, tokenizer):
    from cbd_ray.resize import activation_scores, calib_blocks

    ck = Checkpoint(anchors[family][1])
    blocks = calib_blocks(tokenizer, CALIB, block=64, max_blocks=4)
    first, second = activation_scores(ck, blocks), activation_scores(ck, blocks)
    L = large_shape(family)
    assert first["hidden"].shape == (L.hidden,) and first["heads"].shape == (L.layers, L.heads)
    assert first["ffn"].shape == (L.layers, L.ffn) and first["layers"].shape == (L.layers,)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert bool((first["layers"] > 0).all()) and bool((first["layers"] < 2).all())
    target = small_shape(family)
    opts = ResizeOptions(calib_texts=CALIB).resolved()
    assert opts.width_subset == "importance" and opts.layer_subset == "importance"
    p1 = plan_resize(Scorer(ck, blocks), target, opts)
    p2 = plan_resize(Scorer(Checkpoint(anchors[family][1]), blocks), target, opts)
    assert p1 == p2
    # the kept hidden channels are exactly the most active ones, in their original order
    want = sorted(torch.sort(-first["hidden"], stable=True).indices[: target.hidden].tolist())
    assert list(p1.hidden.index) == want
    ffn0 = sorted(torch.sort(-first["ffn"][p1.layers[0][0]], stable=True).indices[: target.ffn].tolist())
    assert list(p1.ffn[0].index) == ffn0


def test_magnitude_subset_is_deterministic_and_differs_from_first_k(anchors, tmp_path):
    src = anchors["llama"][1]
    t = small_shape("llama")
    resize_model(src, t, tmp_path / "a", resize=ResizeOptions(width_subset="magnitude"))
    resize_model(src, t, tmp_path / "b", resize=ResizeOptions(width_subset="magnitude"))
    resize_model(src, t, tmp_path / "c", resize=ResizeOptions(width_subset="first"))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert (tmp_path / "a/model.safetensors").read_bytes() != (tmp_path / "c/model.safetensors").read_bytes()


def test_resize_options_are_checked():
    with pytest.raises(CBDError, match="width_expand='wide'"):
        ResizeOptions(width_expand="wide").resolved()
    with pytest.raises(CBDError, match="calibration"):
        ResizeOptions(layer_subset="importance").resolved()
    r = ResizeOptions().resolved()
    assert (r.layer_subset, r.width_subset, r.layer_expand, r.width_expand) == ("uniform", "magnitude", "replicate", "zero")


@pytest.mark.parametrize("block", [7, 1 << 16])
def test_unit_norms_equal_a_float64_reference(monkeypatch, block):
    # blocks of 7 elements exercise the blockwise sums across slice and row boundaries
    import cbd_ray.resize as resize

    monkeypatch.setattr(resize, "_NORM_BLOCK", block)
    torch.manual_seed(0)
    for shape, dim, unit in [((37, 24), 0, 1), ((37, 24), 1, 1), ((24, 37), 0, 4), ((5, 8, 6), 1, 2), ((5, 8, 6), 2, 3)]:
        t = torch.randn(shape)
        x = t.double().unflatten(dim, (-1, unit))
        ref = x.pow(2).sum(dim=[d for d in range(x.ndim) if d != dim]).sqrt()
        got = resize._unit_norms(t, dim, unit)
        assert got.dtype == torch.float64 and got.shape == (shape[dim] // unit,)
        torch.testing.assert_close(got, ref / ref.mean(), rtol=1e-12, atol=0)
    # bf16 weights are summed exactly as well
    t = torch.randn(16, 12).bfloat16()
    ref = t.double().pow(2).sum(0).sqrt()
    torch.testing.assert_close(resize._unit_norms(t, 1, 1), ref / ref.mean(), rtol=1e-12, atol=0)


def test_select_equals_index_select_on_every_axis():
    from cbd_ray.resize import _select

    torch.manual_seed(0)
    t = torch.randn(6, 7, 9)
    for dim in range(3):
        idx = torch.tensor(sorted(torch.randperm(t.shape[dim])[: t.shape[dim] - 2].tolist()))
        assert torch.equal(_select(t, dim, idx), t.index_select(dim, idx))
        tt = t.transpose(0, 2)  # not contiguous: falls back to index_select
        assert torch.equal(_select(tt, dim, idx[idx < tt.shape[dim]]), tt.index_select(dim, idx[idx < tt.shape[dim]]))


def test_engine_threads_are_restored():
    from cbd_ray.resize import ENGINE_THREADS, engine_threads

    before = torch.get_num_threads()
    torch.set_num_threads(ENGINE_THREADS + 1)
    try:
        with engine_threads():
            assert torch.get_num_threads() == ENGINE_THREADS
        assert torch.get_num_threads() == ENGINE_THREADS + 1
    finally:
        torch.set_num_threads(before)
