"""Edge export: ONNX logits match transformers (onnxruntime), GGUF reads back tensor by tensor
under llama.cpp's names; `cbd export`, `grid.export` in a grid file and in a chain config."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
gguf = pytest.importorskip("gguf")

from cbd_ray import cli  # noqa: E402
from cbd_ray.export import export_model, exports_table, gguf_tensors  # noqa: E402
from cbd_ray.tiny import save_tiny_model  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "qwen3", "llama"])
def test_onnx_logits_match_and_gguf_reads_back(tmp_path, tokenizer, family):
    d = save_tiny_model(tmp_path / family, family, tokenizer=tokenizer, layers=2, hidden=32, heads=4,
                        max_positions=64)
    recs = export_model(d, tmp_path / "out", ["onnx", "gguf"])
    onnx, gg = recs
    assert onnx["max_abs_logit_diff"] < 1e-4 and onnx["bytes"] == (tmp_path / "out" / "model.onnx").stat().st_size
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    assert gg["tensors"] == len(reader.tensors) and "token_embd.weight" in {t.name for t in reader.tensors}
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == {"gpt2": "gpt2", "qwen3": "qwen3", "llama": "llama"}[family]
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        export_model(d, tmp_path / "out", ["gguf"])
    assert "model.onnx" in exports_table(recs) and "read back equal" in exports_table(recs)


def test_gpt2_conv1d_weights_are_transposed_for_llama_cpp(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = save_tiny_model(tmp_path / "g", "gpt2", tokenizer=tokenizer, layers=1, hidden=32, heads=4, max_positions=64)
    state = AutoModelForCausalLM.from_pretrained(d).state_dict()
    t = gguf_tensors("GPT2", AutoConfig.from_pretrained(d), state)
    qkv = state["transformer.h.0.attn.c_attn.weight"].numpy()  # Conv1D: [in 32, out 96]
    assert t["blk.0.attn_qkv.weight"].shape == (96, 32) and np.array_equal(t["blk.0.attn_qkv.weight"], qkv.T)


def test_cli_export_and_bad_format(tmp_path, tokenizer, capsys):
    d = save_tiny_model(tmp_path / "m", "gpt2", tokenizer=tokenizer, layers=1, hidden=32, heads=4, max_positions=64)
    assert cli.main(["export", str(d), "--format", "gguf", "--out", str(tmp_path / "e")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["format"] == "gguf" and line["bytes"] > 0 and (tmp_path / "e" / "model.gguf").is_file()
    assert cli.main(["export", str(d), "--format", "tflite"]) == 2
    assert "tflite unknown; allowed: onnx, gguf" in capsys.readouterr().err


def test_grid_and_chain_configs_take_export(tmp_path):
    from cbd_ray.grid import load_grid
    from cbd_ray.schema import load_config
    from cbd_ray.stages.chain import stage_names

    from cbd_ray.builtin import resolve_config

    g = tmp_path / "g.yaml"
    g.write_text("targets: [{layers: 2, hidden: 32, heads: 4}]\nexport: [onnx, gguf]\n")
    assert load_grid(g).export == ["onnx", "gguf"]
    cfg = load_config(resolve_config("smoke"), ["grid.export=[gguf]"])
    names = stage_names(cfg)
    assert names[-4:] == ["grid", "export", "evaluate", "report"]
    assert "export" not in stage_names(load_config(resolve_config("smoke")))
    with pytest.raises(ValueError, match="export"):
        load_config(resolve_config("smoke"), ["grid.export=[tflite]"])


def test_export_stage_writes_files_listed_with_sizes_in_the_report_section(tmp_path, tokenizer):
    from types import SimpleNamespace

    from cbd_ray.export import exports_section
    from cbd_ray.pipeline import StageContext
    from cbd_ray.stages.export import export_stage

    grid = tmp_path / "run" / "targets"
    save_tiny_model(grid / "t-1x32", "gpt2", tokenizer=tokenizer, layers=1, hidden=32, heads=4, max_positions=64)
    (grid / "targets.json").write_text(json.dumps([{"name": "t-1x32", "path": "t-1x32"}]))
    cfg = SimpleNamespace(grid=SimpleNamespace(export=["gguf"]))
    out = tmp_path / "run" / "exports"
    ctx = StageContext(name="export", run_dir=tmp_path / "run", out=out, work=tmp_path / "w", inputs={"grid": grid},
                       config={}, log=lambda s: None)
    metrics = export_stage(cfg, lambda c, ctx, fn, *a: fn(str(ctx.out), "cpu", *a))(ctx)  # produce without Ray
    size = (out / "t-1x32" / "model.gguf").stat().st_size
    assert metrics["files"] == 1 and metrics["bytes"] == size
    assert json.loads((out / "exports.json").read_text())[0]["path"] == "t-1x32/model.gguf"
    (section,) = exports_section(tmp_path / "run")
    assert "`model.gguf`" in section.body and f"{size / 1e6:,.2f} MB" in section.body and "t-1x32" in section.body


def test_cbd_grid_exports_the_targets_a_grid_file_asks_for(tmp_path, tokenizer, monkeypatch, capsys):
    from cbd_ray import grid as G

    made = save_tiny_model(tmp_path / "models" / "t1", "gpt2", tokenizer=tokenizer, layers=1, hidden=32, heads=4,
                           max_positions=64)
    records = [{"name": "t1", "path": str(made), "status": "ok"},
               {"name": "t2", "path": None, "status": "failed", "error": "RuntimeError: boom"}]
    monkeypatch.setattr(G, "run_grid", lambda *a, **k: records)  # the Ray grid itself is tested in test_grid_ray
    monkeypatch.setattr(G, "format_table", lambda recs: "table")
    grid = tmp_path / "g.yaml"
    grid.write_text("targets: [{name: t1, layers: 1, hidden: 32, heads: 4}]\nexport: [gguf]\n")
    rc = cli.main(["grid", "--small", str(made), "--large", str(made), "--grid", str(grid), "--out",
                   str(tmp_path / "out")])
    assert rc == 1  # one target failed; the other was still exported
    listed = json.loads((tmp_path / "out" / "exports" / "exports.json").read_text())
    assert [(r["model"], r["format"]) for r in listed] == [("t1", "gguf")]
    assert (tmp_path / "out" / "exports" / "t1" / "model.gguf").stat().st_size == listed[0]["bytes"]
    assert "`model.gguf`" in capsys.readouterr().out
