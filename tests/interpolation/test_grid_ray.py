"""The interpolation grid on a local Ray: an actor pool makes every target, one failure
loses nothing else, and the job entry point runs end to end."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbd_ray import grid as G

from conftest import ROOT

pytestmark = pytest.mark.ray
TARGETS = [
    {"name": "as-small", "layers": 2, "hidden": 32, "heads": 2, "alpha": 1.0},
    {"name": "deeper", "layers": 4, "hidden": 32, "heads": 2},
    {"name": "wider", "layers": 2, "hidden": 64, "heads": 4, "alpha": 0.5},
    {"name": "middle", "layers": 3, "hidden": 48, "heads": 3},
]


def test_grid_runs_through_two_actors_and_every_output_loads(ray_clean, gpt2_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    lines: list[str] = []
    records = G.run_grid(*gpt2_pair, TARGETS, tmp_path / "grid", num_actors=2, log=lines.append)
    assert [r["name"] for r in records] == [t["name"] for t in TARGETS]  # grid order
    assert all(r["status"] == "ok" for r in records), records
    assert sum(line.startswith("[") for line in lines) == len(TARGETS) and "ETA" in lines[1]
    for t, r in zip(TARGETS, records):
        model = AutoModelForCausalLM.from_pretrained(r["path"])
        cfg = model.config
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (t["layers"], t["hidden"], t["heads"])
        assert r["params"] == sum(p.numel() for p in model.parameters())
        out = model(torch.tensor([[1, 2, 3]])).logits
        assert out.shape == (1, 3, cfg.vocab_size) and torch.isfinite(out).all()
    # α reaches the actor: α=1 on the small anchor's shape returns the small anchor exactly.
    small_w = load_file(str(gpt2_pair[0] / "model.safetensors"))
    made = load_file(str(Path(records[0]["path"]) / "model.safetensors"))
    assert records[0]["alpha"] == 1.0 and records[2]["alpha"] == 0.5
    assert all(torch.equal(made[k], small_w[k]) for k in small_w)
    saved = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert saved["failed"] == 0 and [r["name"] for r in saved["records"]] == [t["name"] for t in TARGETS]
    assert (tmp_path / "grid" / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_failing_target_and_crashed_actor_lose_nothing_else(ray_clean, gpt2_pair, tmp_path):
    class Flaky(G.Interpolator):
        def make(self, shape, out_dir, alpha="auto", overwrite=False, name=None):
            if name == "deeper":
                raise RuntimeError("simulated disk failure")
            if name == "wider":
                os._exit(1)  # the process dies, as when the OOM killer strikes
            return super().make(shape, out_dir, alpha, overwrite, name)

    targets = TARGETS + [{"name": "middle-2", "layers": 3, "hidden": 48, "heads": 3, "alpha": 0.25}]
    records = G.run_grid(*gpt2_pair, targets, tmp_path / "grid", num_actors=2, progress=False,
                         actor_class=ray_clean.remote(max_restarts=0)(Flaky))
    assert [r["status"] for r in records] == ["ok", "failed", "failed", "ok", "ok"]
    assert "simulated disk failure" in records[1]["error"] and records[1]["path"] is None
    assert "Actor" in records[2]["error"]  # the crash is reported, its actor replaced
    assert not (tmp_path / "grid" / "deeper").exists() and not (tmp_path / "grid" / "wider").exists()
    for r in (records[0], records[3], records[4]):
        assert (Path(r["path"]) / "model.safetensors").is_file()
    assert json.loads((tmp_path / "grid" / "grid.json").read_text())["failed"] == 2
    assert "FAILED: RuntimeError: simulated disk failure" in G.format_table(records)


def test_job_demo_builds_anchors_and_makes_the_demo_grid(ray_clean, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import interpolate_grid
    finally:
        sys.path.pop(0)
    assert interpolate_grid.main(["--demo", "--out", str(tmp_path), "--actors", "2"]) == 0
    saved = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert saved["failed"] == 0 and saved["targets"] >= 4
    table = capsys.readouterr().out
    assert "parameters" in table and all(r["name"] in table for r in saved["records"])
    # a second run reuses the identical targets (no work, nothing overwritten)
    assert interpolate_grid.main(["--demo", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "grid" / "grid.json").read_text())["records"]
    assert all(r.get("reused") for r in again) and len(again) == len(saved["records"])

