"""`cbd interpolate` end to end: one JSON line on success, unspecified axes keep the smaller
anchor's values, bad input exits 2 with the reason on stderr."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from anchor_models import make_anchors
from cbd_ray.cli import main

from conftest import ROOT



@pytest.fixture(scope="module")
def anchors(tmp_path_factory, tokenizer):
    return make_anchors(tmp_path_factory.mktemp("anchors"), tokenizer, families=("llama", "gpt2"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["interpolate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_makes_a_target_and_prints_its_record(anchors, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    s, l = anchors["llama"]
    rc, out, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "t",
                           "--layers", 3, "--hidden", 48, "--heads", 6, "--kv-heads", 3, "--ffn", 96, "--alpha", "0.4")
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["shape"] == {"layers": 3, "hidden": 48, "heads": 6, "kv_heads": 3, "ffn": 96}
    assert rec["alpha"] == 0.4 and Path(rec["path"]) == tmp_path / "t"
    model = AutoModelForCausalLM.from_pretrained(rec["path"])
    assert sum(p.numel() for p in model.parameters()) == rec["params"]


def test_cli_unspecified_axes_keep_the_small_anchors_values(anchors, tmp_path, capsys):
    s, l = anchors["llama"]
    rc, out, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "deeper", "--layers", 4)
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["shape"] == {"layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn": 64}
    assert 0.0 < rec["alpha"] < 1.0


def test_cli_calibration_file_selects_importance(anchors, tmp_path, capsys):
    s, l = anchors["gpt2"]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"instruction": f"Explain topic {i}.", "context": "",
                                           "response": "Python lists are mutable sequences. " * 8}) for i in range(6)))
    rc, out, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "c", "--layers", 3,
                           "--hidden", 48, "--heads", 6, "--calib", calib, "--width-expand", "copy")
    assert rc == 0, err
    meta = json.loads((tmp_path / "c/cbd.json").read_text())
    assert meta["resize"]["width_subset"] == "importance" and meta["resize"]["layer_subset"] == "importance"
    assert meta["resize"]["width_expand"] == "copy" and meta["resize"]["calib"]["texts"] == 6


@pytest.mark.parametrize("extra,msg", [
    (["--hidden", "48", "--heads", "5"], "heads=5 does not divide hidden=48"),
    (["--alpha", "1.5"], "alpha=1.5 is outside"),
    (["--alpha", "lots"], "--alpha 'lots'"),
    (["--layers", "9"], "layers=9 is outside the anchors' range"),
    (["--calib", "/nonexistent/calib.txt"], "calibration file /nonexistent/calib.txt does not exist"),
])
def test_cli_bad_input_exits_2_with_the_reason(anchors, tmp_path, capsys, extra, msg):
    s, l = anchors["llama"]
    rc, out, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "x", *extra)
    assert rc == 2 and msg in err and err.startswith("cbd interpolate: error:")
    assert not (tmp_path / "x").exists()


def test_cli_different_families_and_existing_output(anchors, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--small", anchors["gpt2"][0], "--large", anchors["llama"][1], "--out", tmp_path / "x")
    assert rc == 2 and "bridge first" in err
    s, l = anchors["gpt2"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/model.txt").write_text("someone else's")
    rc, _, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "busy", "--layers", 3)
    assert rc == 2 and "cbd-ray did not write" in err
    # a folder cbd-ray did not write is never replaced, not even with --overwrite
    rc, out, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "busy", "--layers", 3, "--overwrite")
    assert rc == 2 and (tmp_path / "busy/model.txt").read_text() == "someone else's"
    rc, _, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "made", "--layers", 3)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "made", "--layers", 4)
    assert rc == 2 and "--overwrite" in err
    rc, _, err = run_cli(capsys, "--small", s, "--large", l, "--out", tmp_path / "made", "--layers", 4, "--overwrite")
    assert rc == 0, err


def test_installed_cbd_command_runs_in_a_subprocess(anchors, tmp_path):
    s, l = anchors["gpt2"]
    cbd = ROOT / ".venv/bin/cbd"
    if not cbd.exists():
        pytest.skip("no .venv/bin/cbd (package not installed in .venv)")
    p = subprocess.run([str(cbd), "interpolate", "--small", str(s), "--large", str(l), "--out", str(tmp_path / "sub"),
                        "--layers", "3", "--hidden", "48", "--heads", "6", "--alpha", "auto"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["shape"]["hidden"] == 48 and (tmp_path / "sub/model.safetensors").is_file()


def test_calibration_files_text_jsonl_and_dolly(tmp_path, shared_data):
    from cbd_ray.errors import CBDError
    from cbd_ray.interpolate import load_calib_texts

    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    assert load_calib_texts(tmp_path / "a.txt") == ["first paragraph\nstill first", "second one"]
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert load_calib_texts(tmp_path / "b.jsonl") == ["hello", "world"]
    (tmp_path / "c.jsonl").write_text('{"prompt": "no usable field"}\n')
    with pytest.raises(CBDError, match="c.jsonl:1: record has no 'text' or 'instruction'"):
        load_calib_texts(tmp_path / "c.jsonl")
    dolly = load_calib_texts(shared_data / "dolly" / "dolly_eval.jsonl", limit=5)
    assert len(dolly) == 5 and all(len(t) > 20 for t in dolly)
