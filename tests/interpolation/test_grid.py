"""The interpolation grid without Ray: grid files, the parameter-count shape search,
validation of a whole grid before any work, the result table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cbd_ray import grid as G
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.interpolate import AnchorPair, Shape

from conftest import ROOT



def gpt2_params(s: Shape, vocab: int = 50257, positions: int = 1024) -> int:
    """GPT-2's parameter count written out (tied lm_head): embeddings, per block two
    LayerNorms, fused QKV, attention output, MLP; a final LayerNorm."""
    h, f = s.hidden, s.ffn or 4 * s.hidden
    block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    return vocab * h + positions * h + s.layers * block + 2 * h


GPT2_SMALL = Shape(layers=12, hidden=768, heads=12, ffn=3072)
GPT2_MEDIUM = Shape(layers=24, hidden=1024, heads=16, ffn=4096)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


def test_grid_yaml_gives_targets_range_alpha_and_resize(tmp_path):
    spec = G.load_grid(write(tmp_path, """
alpha: 0.25
resize: {layer_expand: replicate}
targets:
  - {name: a, layers: 3, hidden: 48, heads: 3, alpha: 0.5}
  - {layers: 2, hidden: 64, heads: 4, ffn: 200}
params: {min: 1.0e5, max: 2.0e5, count: 3}
"""))
    assert spec.alpha == 0.25 and spec.resize == {"layer_expand": "replicate"}
    assert [(t.name, t.layers, t.hidden, t.heads, t.ffn, t.alpha) for t in spec.targets] == [
        ("a", 3, 48, 3, None, 0.5), (None, 2, 64, 4, 200, None)]
    assert (spec.params.min, spec.params.max, spec.params.count) == (1e5, 2e5, 3)


def test_shipped_demo_grid_loads():
    spec = G.load_grid(ROOT / "configs" / "grid_demo.yaml")
    assert len(spec.targets) + spec.params.count >= 4
    assert G.resize_options(spec) is not None


@pytest.mark.parametrize("text, words", [
    ("targets: [{name: a, layers: 2, hidden: 64, heads: 4, bogus: 1}]", ["targets.0.bogus", "unknown key"]),
    ("targets: [{name: a, layers: 0, hidden: 64, heads: 4}]", ["targets.0.layers"]),
    ("targets: [{name: a, layers: 2, hidden: 64, heads: 4, alpha: half}]", ["targets.0.alpha"]),
    ("alpha: auto\n", ["needs `targets`", "`params`"]),
    ("params: {min: 1.0e5, count: 0}", ["params.count"]),
])
def test_bad_grid_file_is_a_config_error_naming_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        G.load_grid(write(tmp_path, text))
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("resize, words", [
    ({"layer_subsett": "uniform"}, ["layer_subsett", "allowed: layer_subset"]),
    ({"layer_subset": "bogus"}, ["bogus", "uniform"]),
])
def test_bad_resize_choice_in_grid_is_an_error(resize, words):
    spec = G.parse_grid({"resize": resize, "targets": [{"layers": 2, "hidden": 32, "heads": 2}]})
    with pytest.raises(CBDError) as err:
        G.resize_options(spec)
    for w in words:
        assert w in str(err.value)


def test_params_search_hits_targets_between_gpt2_small_and_medium():
    """Stated tolerance: 2% of the wanted count; head_dim 64 and FFN = 4 x hidden kept."""
    lo, hi, n = 140e6, 340e6, 9
    prange = G.ParamsRange(min=lo, max=hi, count=n)
    targets = G.shapes_for_params(prange, GPT2_SMALL, GPT2_MEDIUM, gpt2_params)
    wanted = [lo + i * (hi - lo) / (n - 1) for i in range(n)]
    assert len(targets) == n
    for want, t in zip(wanted, targets):
        s = t.shape
        assert abs(gpt2_params(s) - want) / want <= 0.02, (want, s)
        assert 12 <= s.layers <= 24 and 768 <= s.hidden <= 1024 and 3072 <= s.ffn <= 4096
        assert s.hidden == 64 * s.heads and s.ffn == 4 * s.hidden
    counts = [gpt2_params(t.shape) for t in targets]
    assert counts == sorted(counts)
    # deterministic: the same range gives the same shapes
    assert G.shapes_for_params(prange, GPT2_SMALL, GPT2_MEDIUM, gpt2_params) == targets


def test_params_search_prefers_even_growth_and_finds_the_papers_shapes():
    # The paper's 138M (14 x 768) and 220M (18 x 896) between GPT-2 small and medium.
    assert G.search_shape(138e6, GPT2_SMALL, GPT2_MEDIUM, gpt2_params) == Shape(14, 768, 12, None, 3072)
    assert G.search_shape(220e6, GPT2_SMALL, GPT2_MEDIUM, gpt2_params) == Shape(18, 896, 14, None, 3584)


def test_params_search_keeps_gqa_group_size():
    small = Shape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128)
    large = Shape(layers=4, hidden=128, heads=8, kv_heads=4, ffn=256)
    for s in G.candidate_shapes(small, large):
        assert s.heads == s.hidden // 16 and s.kv_heads * 2 == s.heads and s.ffn == 2 * s.hidden


def test_params_range_outside_anchors_names_their_counts():
    with pytest.raises(ConfigError) as err:
        G.shapes_for_params(G.ParamsRange(min=100e6, max=300e6, count=3), GPT2_SMALL, GPT2_MEDIUM, gpt2_params)
    assert "params.min=1e+08" in str(err.value) and f"{gpt2_params(GPT2_SMALL):,}" in str(err.value)


def test_params_range_resolves_against_real_anchors(gpt2_pair):
    pair = AnchorPair(*gpt2_pair)
    spec = G.parse_grid({"params": {"count": 4}})  # ends default to the anchors' counts
    targets = G.resolve_targets(spec, pair)
    assert targets[0].shape.layers == 2 and targets[-1].shape.layers == 4
    assert targets[0].shape.hidden == 32 and targets[-1].shape.hidden == 64
    counts = [pair.params_of(t.shape) for t in targets]
    assert counts[0] == pair.small_params and counts[-1] == pair.large_params
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_bad_grid_entries_all_fail_before_any_work(gpt2_pair, tmp_path, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the grid was validated")

    monkeypatch.setattr(G, "ensure_ray", no_ray)
    (tmp_path / "out" / "taken").mkdir(parents=True)
    (tmp_path / "out" / "taken" / "notes.txt").write_text("not a model")
    bad = [
        {"name": "ok", "layers": 3, "hidden": 48, "heads": 3},
        {"name": "odd-heads", "layers": 3, "hidden": 48, "heads": 5},
        {"name": "too-deep", "layers": 9, "hidden": 48, "heads": 3},
        {"name": "bad-alpha", "layers": 3, "hidden": 48, "heads": 3, "alpha": 1.5},
        {"name": "ok", "layers": 2, "hidden": 32, "heads": 2},
        {"name": "a/b", "layers": 2, "hidden": 32, "heads": 2},
        {"name": "taken", "layers": 2, "hidden": 32, "heads": 2},
    ]
    with pytest.raises(CBDError) as err:
        G.run_grid(*gpt2_pair, bad, tmp_path / "out")
    msg = str(err.value)
    for name in ("odd-heads", "too-deep", "bad-alpha", "'a/b'", "repeats target 0", "holds something else"):
        assert name in msg, name
    assert "target 0 ('ok')" not in msg  # the good entry is not blamed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["taken"]  # nothing written


def test_format_table_lists_every_target_and_failures():
    records = [
        {"name": "p1", "shape": {"layers": 14, "hidden": 768, "heads": 12, "kv_heads": None, "ffn": 3072},
         "params": 138615552, "alpha": 0.9384, "seconds": 3.21, "path": "/x/p1", "status": "ok"},
        {"name": "p2", "shape": {"layers": 3, "hidden": 48, "heads": 3, "kv_heads": None, "ffn": None},
         "params": None, "alpha": "auto", "seconds": 0.5, "path": None, "status": "failed",
         "error": "RuntimeError: disk full\nmore"},
    ]
    lines = G.format_table(records).splitlines()
    assert lines[0].split() == ["target", "shape", "parameters", "alpha", "seconds", "path"]
    assert len(lines) == 4
    assert lines[2].split()[:7] == ["p1", "14x768x12", "ffn3072", "138,615,552", "0.938", "3.21", "/x/p1"]
    assert "FAILED: RuntimeError: disk full" in lines[3] and "more" not in lines[3]


def test_job_bad_input_exits_2_with_the_error(tmp_path):
    """As a script (no Ray needed: the grid file is checked first)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "interpolate_grid.py"), "--small", str(tmp_path), "--large",
         str(tmp_path), "--grid", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "missing.yaml does not exist" in proc.stderr
