"""The chain job end to end on the smoke config with the shared local Ray, through
jobs/build_chain.py's main() in-process: a run killed after the first chain step resumes
without redoing it, a corrupted anchor file is detected and rebuilt, a heterogeneous bridge
(different family and tokenizer) runs, and bad storage / another config's run directory are
refused before any work."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SMOKE_ONE_ANCHOR

SMOKE = ROOT / "configs" / "smoke.yaml"


def _main():
    spec = importlib.util.spec_from_file_location("build_chain", ROOT / "jobs" / "build_chain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


class Killed(BaseException):
    """Stands for the job being killed: not an Exception, so nothing on the way catches it."""


def file_sha256_of_bytes(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


# ------------------------------------------------------------------ no Ray needed


def test_unwritable_storage_fails_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = _main()(["--config", str(SMOKE), "--storage", str(blocker / "runs")])
    assert rc == 2
    assert "cannot be written" in capsys.readouterr().err
    assert not (blocker.parent / "runs").exists()


def test_run_dir_of_another_config_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps(
        {"version": 1, "stages": {}, "identity": {"name": "smoke", "structure": "0" * 64}}))
    rc = _main()(["--config", str(SMOKE), "--storage", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "belongs to another config" in err and "--force" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"]  # nothing was started


def test_bad_from_stage_and_bad_override_exit_2(tmp_path, capsys):
    assert _main()(["--config", str(SMOKE), "--storage", str(tmp_path), "--from-stage", "chain_9"]) == 2
    assert "chain_9" in capsys.readouterr().err and not (tmp_path / "smoke").exists()
    assert _main()(["--config", str(SMOKE), "--storage", str(tmp_path), "grid.actors=0"]) == 2
    assert "grid.actors" in capsys.readouterr().err


def test_remote_storage_gets_a_private_driver_copy_keyed_by_uri(tmp_path, monkeypatch):
    from cbd_ray.schema import load_config
    from cbd_ray.stages.rundir import resolve_run_dir

    monkeypatch.setenv("CBD_LOCAL_RUNS", str(tmp_path / "mirror"))
    cfg = load_config(SMOKE)
    uri, local, remote = resolve_run_dir(cfg, "s3://bucket/cbd/")
    assert (uri, remote) == ("s3://bucket/cbd/smoke", True)
    assert local.parent == tmp_path / "mirror" and local.name.startswith("smoke-")  # keyed by the URI
    assert resolve_run_dir(cfg, "s3://other/cbd")[1] != local
    uri, local, remote = resolve_run_dir(cfg, f"file://{tmp_path}/runs")
    assert (local, remote) == (tmp_path / "runs" / "smoke", False)


# ------------------------------------------------------------------ on the shared local Ray

@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, ray_session):
    """Run the smoke chain, kill it right after chain_1, rerun it to the end."""
    pytest.importorskip("cbd_ray.train")
    storage = tmp_path_factory.mktemp("chain")
    main = _main()

    def kill_after_chain_1(name: str, rec: dict) -> None:
        if name == "chain_1":
            raise Killed(name)

    with pytest.raises(Killed):
        main(["--config", str(SMOKE), "--storage", str(storage)], after_stage=kill_after_chain_1)
    run_dir = storage / "smoke"
    first = manifest(run_dir)
    rc = main(["--config", str(SMOKE), "--storage", str(storage)])
    return run_dir, first, rc


@pytest.mark.ray
@pytest.mark.slow
def test_killed_after_first_chain_step_resumes_without_redoing_it(killed_then_resumed, ray_clean):
    run_dir, first, rc = killed_then_resumed
    assert rc == 0
    assert [first[s]["status"] for s in ("data", "source", "chain_1")] == ["done"] * 3
    assert "chain_2" not in first and "grid" not in first
    final = manifest(run_dir)
    for s in ("data", "source", "chain_1"):  # not redone: same attempt, same timestamps
        assert final[s]["finished"] == first[s]["finished"] and final[s]["attempts"] == 1
    assert final["chain_2"]["started"] > first["chain_1"]["finished"]
    assert all(r["status"] == "done" for r in final.values())
    # the manifest carries what the issue asks for
    c1 = final["chain_1"]
    assert c1["teacher"] == "source" and c1["teacher_tokens"] > 0 and c1["student_tokens"] > 0
    assert c1["inputs"]["source"] == final["source"]["outputs"]["digest"]
    assert "model.safetensors" in c1["outputs"]["checksums"] and c1["wall_s"] > 0 and len(c1["config_hash"]) == 64


@pytest.mark.ray
@pytest.mark.slow
def test_every_target_has_heldout_loss_against_random_init_and_a_report(killed_then_resumed, ray_clean):
    run_dir, _, _ = killed_then_resumed
    rows = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    targets = {r["model"]: r for r in rows if r["kind"] == "target"}
    assert sorted(targets) == ["t-1x48", "t-2x32", "t-2x64", "t-3x48"]
    for r in rows:
        assert r["heldout_nll"] > 0 and r["random_nll"] > 0 and r["params"] > 0
    src = next(r for r in rows if r["model"] == "source")
    assert src["heldout_nll"] < src["random_nll"] - 0.1  # the pretrained source learned the text
    # the target next to the source (α on the small anchor below 1) inherits some of that
    assert targets["t-2x64"]["heldout_nll"] < targets["t-2x64"]["random_nll"]
    report = (run_dir / "report.md").read_text()
    assert "Held-out loss" in report and "Teacher cost" in report and "t-2x64" in report
    assert (run_dir / "plots" / "heldout_loss.png").stat().st_size > 1000
    # `cbd report RUN_DIR` regenerates the report from the run directory alone
    from cbd_ray.cli import main as cbd

    (run_dir / "report.md").unlink()
    assert cbd(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == report
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(run_dir / "targets" / "t-3x48")
    assert (m.config.n_layer, m.config.n_embd, m.config.n_head) == (3, 48, 3)


@pytest.mark.ray
@pytest.mark.slow
def test_corrupted_anchor_is_detected_and_rebuilt(killed_then_resumed, ray_clean):
    run_dir, _, _ = killed_then_resumed
    before = manifest(run_dir)
    weights = run_dir / "models" / "a2" / "model.safetensors"
    good = before["chain_2"]["outputs"]["checksums"]["model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    assert _main()(["--config", str(SMOKE), "--storage", str(run_dir.parent)]) == 0
    after = manifest(run_dir)
    assert after["chain_2"]["attempts"] == before["chain_2"]["attempts"] + 1
    assert after["chain_2"]["finished"] > before["chain_2"]["finished"]
    from cbd_ray.storage import file_sha256

    assert file_sha256(weights) == after["chain_2"]["outputs"]["checksums"]["model.safetensors"]
    for s in ("data", "source", "chain_1"):
        assert after[s]["finished"] == before[s]["finished"]
    assert file_sha256(weights) != file_sha256_of_bytes(bytes(data))
    # retrained from scratch with the same seed and data: the same weights again
    assert file_sha256(weights) == good
    # ... so nothing after it is redone: the digest covers the model files, not the timings
    for s in ("grid", "evaluate", "report"):
        assert after[s]["finished"] == before[s]["finished"], s


@pytest.mark.ray
@pytest.mark.slow
def test_a_chain_step_cut_short_mid_training_resumes_from_its_checkpoint(tmp_path, ray_clean):
    """chain_1's worker dies after its step-2 checkpoint (no restart allowed): the job exits 1
    with the stage recorded as failed; the rerun continues chain_1 from that checkpoint and
    does not redo the stages before it. The same run (one chain for both, to keep the suite
    short) cuts a validation split of its text, on which grid.alpha: search blends each target
    at α values that include both anchors and keeps the lowest validation loss."""
    over = [*SMOKE_ONE_ANCHOR,  # first: it replaces the anchors the next overrides change
            "anchors.0.distill.fail_at_step=2", "anchors.0.distill.checkpoint_every=1", "scaling.max_failures=0",
            "data.val_fraction=0.05", "grid.alpha=search", "grid.search_windows=2"]
    main = _main()
    assert main(["--config", str(SMOKE), "--storage", str(tmp_path), *over]) == 1
    first = manifest(tmp_path / "smoke")
    assert first["chain_1"]["status"] == "failed" and "injected failure" in first["chain_1"]["error"]
    assert list((tmp_path / "smoke" / "work" / "chain_1" / "ray_train").glob("chain_1-*/checkpoint_*"))
    assert main(["--config", str(SMOKE), "--storage", str(tmp_path), *over]) == 0
    final = manifest(tmp_path / "smoke")
    assert final["chain_1"]["attempts"] == 2 and final["chain_1"]["status"] == "done"
    assert [c["step"] for c in final["chain_1"]["metrics"]["checkpoints"]] == [1, 2, 3, 4]  # each step once
    for s in ("data", "source"):
        assert final[s]["finished"] == first[s]["finished"]
    run = tmp_path / "smoke"
    assert (run / "data" / "text_val.txt").is_file()
    searched = [r["alpha_search"] for r in json.loads((run / "targets" / "targets.json").read_text())]
    assert len(searched) == 2
    for a in searched:
        assert {0.0, 1.0} <= set(a["alphas"])
        assert a["val_loss"] == min(a["val_losses"]) and a["alpha"] == a["alphas"][a["val_losses"].index(a["val_loss"])]


@pytest.mark.ray
@pytest.mark.slow
def test_heterogeneous_bridge_runs_end_to_end(tmp_path, ray_clean):
    """A tiny Llama teacher (BPE 512 on Python's docs) answers prompts; a tiny GPT-2 (BPE
    384 on the instruction records) is fine-tuned on the answers and then teaches the chain."""
    pytest.importorskip("cbd_ray.train")
    from transformers import AutoConfig, AutoTokenizer

    cfg = yaml.safe_load(SMOKE.read_text())
    cfg = copy.deepcopy(cfg)
    cfg["run"]["name"] = "bridge"
    cfg["bridge"] = {
        "teacher": {"tiny": {"family": "llama", "shape": {"layers": 2, "hidden": 64, "heads": 4},
                             "max_positions": 256, "tokenizer": {"vocab_size": 512, "text": "builtin"},
                             "pretrain": {"steps": 20, "batch_size": 4, "seq_len": 64, "lr": 3.0e-3}}},
        "generation": {"max_new_tokens": 12, "batch_size": 8, "actors": 1, "prompts": 16},
        "distill": {"objective": "seqkd", "steps": 3},
    }
    cfg["source"]["tiny"]["tokenizer"] = {"vocab_size": 384, "text": "instructions"}
    cfg["source"]["tiny"]["pretrain"]["steps"] = 0
    cfg["anchors"] = cfg["anchors"][:1]
    cfg["grid"]["targets"] = cfg["grid"]["targets"][:1]
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _main()(["--config", str(path), "--storage", str(tmp_path)]) == 0
    run_dir = tmp_path / "bridge"
    m = manifest(run_dir)
    order = json.loads((run_dir / "manifest.json").read_text())["order"]
    assert order[:6] == ["data", "teacher", "bridge_data", "source", "bridge", "chain_1"]
    assert all(m[s]["status"] == "done" for s in order)
    teacher = run_dir / "models" / "teacher"
    bridge = run_dir / "models" / "bridge"
    assert AutoConfig.from_pretrained(teacher).model_type == "llama"
    assert AutoConfig.from_pretrained(bridge).model_type == "gpt2"
    assert len(AutoTokenizer.from_pretrained(teacher)) == 512 and len(AutoTokenizer.from_pretrained(bridge)) == 384
    answers = [json.loads(x) for x in (run_dir / "data" / "bridge" / "answers.jsonl").read_text().splitlines()]
    assert answers and all(a["response"].strip() for a in answers)
    assert m["bridge_data"]["teacher_tokens"] > 0 and m["bridge_data"]["teacher"] == "teacher"
    assert m["bridge"]["student_tokens"] > 0
    # the bridge, not the Llama teacher, teaches the chain
    assert m["chain_1"]["inputs"] == {"bridge": m["bridge"]["outputs"]["digest"], "data": m["data"]["outputs"]["digest"]}

