"""A careless user's bad inputs, as a table: every case exits with the expected code, says
what is wrong in one or two lines of stderr naming the bad value, leaves the whole working
tree (the user's files, the anchors, earlier outputs) bit for bit as it was, and fails
before Ray starts.

Most cases run in this process through the entry points' own error boundary
(``cbd_ray.errors.run_main``); a few run as real subprocesses (``python -m cbd_ray.cli``,
``python jobs/*.py``) so the installed boundary is exercised end to end.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anchor_models import save
from cbd_ray.cli import main as cbd_main
from cbd_ray.errors import run_main
from cbd_ray.interpolate import Shape

from conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tree_hash(root: Path) -> str:
    """sha256 over every path under ``root`` with its kind, mode and content."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}|{st.st_mode:o}|".encode())
        if p.is_file() and not p.is_symlink():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# ------------------------------------------------------------------------------ the workspace


def _models(ws: Path, tokenizer) -> None:
    m = ws / "models"
    small = save(ws / "anchors", "gpt2", Shape(2, 32, 4, None, 64), tokenizer, 1, "small")
    save(ws / "anchors", "gpt2", Shape(4, 64, 8, None, 128), tokenizer, 2, "large")
    save(m, "llama", Shape(4, 64, 8, 4, 128), tokenizer, 3, "other")
    for name in ("trunc", "nocfg", "badcfg", "bin", "notok"):
        shutil.copytree(small, m / name)
    f = m / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 100])
    (m / "nocfg" / "config.json").unlink()
    (m / "badcfg" / "config.json").write_text('{"model_type": "gpt2",')
    (m / "bin" / "model.safetensors").rename(m / "bin" / "pytorch_model.bin")
    for t in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (m / "notok" / t).unlink(missing_ok=True)


def _data(ws: Path, shared_data: Path) -> None:
    d = ws / "data"
    d.mkdir()
    good = (shared_data / "dolly" / "dolly_train_1k.jsonl").read_text().splitlines()[:8]
    (d / "good.jsonl").write_text("\n".join(good) + "\n")
    (d / "bad_utf8.jsonl").write_bytes(("\n".join(good[:2]) + "\n").encode() + b'{"instruction": "caf\xe9"}\n')
    (d / "bad_json.jsonl").write_text(good[0] + "\n{'instruction': 'single quotes'}\n")
    (d / "no_response.jsonl").write_text(good[0] + "\n" + json.dumps({"instruction": "hi", "context": ""}) + "\n")
    (d / "bad.json").write_text('[\n  {"instruction": "a", "response": "b"},\n  oops\n]\n')
    (d / "calib_bad.txt").write_bytes(b"first paragraph\n\nsecond \xff\xfe paragraph\n")
    (d / "calib_bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')


def _configs(ws: Path) -> None:
    c = ws / "configs"
    c.mkdir()
    demo = DEMO.read_text()
    (c / "dup.yaml").write_text(demo.replace("run:\n  name: demo\n", "run:\n  name: demo\n  name: other\n"))
    (c / "tab.yaml").write_text("run:\n  name: demo\n\tstorage: runs\n")
    (c / "latin1.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    (c / "grid_dup.yaml").write_text("targets:\n  - {name: a, layers: 3, hidden: 48, heads: 6}\nalpha: 0.5\nalpha: 0.7\n")
    (c / "grid.yaml").write_text("targets:\n  - {name: a, layers: 3, hidden: 48, heads: 6}\n")


def _user_and_runs(ws: Path) -> None:
    u = ws / "user"
    u.mkdir()
    (u / "notes.txt").write_text("my notes\n")
    (u / "grid.json").write_text('{"mine": true}\n')
    (u / "grid.png").write_bytes(b"\x89PNG my plot")
    (u / "results.json").write_text('{"not": "cbd"}\n')
    r = ws / "runs"
    for name, text in (("listrun", "[1, 2]"), ("badrun", "{not json"), ("badeval", None)):
        (r / name).mkdir(parents=True)
        (r / name / "manifest.json").write_text(text or json.dumps({"version": 1, "stages": {"grid": {"status": "done"}}}))
    (r / "badeval" / "evaluation").mkdir()
    (r / "badeval" / "evaluation" / "evaluation.json").write_text("[\n  {\"model\": 1},\n  nope\n]\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer, shared_data) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    _models(ws, tokenizer)
    _data(ws, shared_data)
    _configs(ws)
    _user_and_runs(ws)
    s, l = ws / "anchors" / "gpt2-small", ws / "anchors" / "gpt2-large"
    assert cbd_main(["interpolate", "--small", str(s), "--large", str(l), "--out", str(ws / "made"),
                     "--layers", "3"]) == 0
    made_foreign = ws / "made_foreign"
    shutil.copytree(ws / "made", made_foreign)
    (made_foreign / "notes.txt").write_text("mine, inside a cbd output\n")
    (ws / "results_ok.json").write_text('[{"task": "boolq", "metrics": {}}]\n')
    return ws


# ------------------------------------------------------------------------------ the table

S, L = "{ws}/anchors/gpt2-small", "{ws}/anchors/gpt2-large"
T, ST = L, S  # teacher and student for `cbd distill`
GOOD = "{ws}/data/good.jsonl"
INTERP = ["interpolate", "--small", S, "--large", L]
DISTILL = ["distill", "--teacher", T, "--student", ST, "--data", GOOD]
EVAL = ["evaluate", "--model", S, "--tasks", "boolq", "--no-progress"]
GRID = ["--small", S, "--large", L, "--grid", "{ws}/configs/grid.yaml"]
DUP_DEMO = ["--config", "{ws}/configs/dup.yaml"]

# (id, entry point, argv, exit code, text stderr must contain)
CASES = [
    # cbd interpolate: the output rule
    ("interp-out-contains-anchors", "cbd", INTERP + ["--out", "{ws}/anchors", "--overwrite"], 2, "contains the small anchor"),
    ("interp-out-is-anchor", "cbd", INTERP + ["--out", S, "--overwrite"], 2, "is the small anchor itself"),
    ("interp-out-inside-anchor", "cbd", INTERP + ["--out", S + "/sub"], 2, "lies inside the small anchor"),
    ("interp-out-workspace-root", "cbd", INTERP + ["--out", "{ws}", "--overwrite"], 2, "contains the small anchor"),
    ("interp-out-user-dir", "cbd", INTERP + ["--out", "{ws}/user"], 2, "cbd-ray did not write"),
    ("interp-out-user-dir-overwrite", "cbd", INTERP + ["--out", "{ws}/user", "--overwrite"], 2, "cbd-ray did not write"),
    ("interp-out-is-a-file", "cbd", INTERP + ["--out", "{ws}/user/notes.txt"], 2, "is a file"),
    ("interp-out-ours-with-user-file", "cbd", INTERP + ["--out", "{ws}/made_foreign", "--overwrite"], 2,
     "notes.txt which cbd-ray did not write"),
    ("interp-out-other-target-no-overwrite", "cbd", INTERP + ["--out", "{ws}/made", "--layers", "4"], 2, "--overwrite"),
    # cbd interpolate: models and values
    ("interp-small-truncated", "cbd", ["interpolate", "--small", "{ws}/models/trunc", "--large", L, "--out", "{ws}/o"],
     2, "trunc/model.safetensors is truncated"),
    ("interp-small-missing", "cbd", ["interpolate", "--small", "{ws}/nope", "--large", L, "--out", "{ws}/o"], 2,
     "nope does not exist"),
    ("interp-small-pickle-only", "cbd", ["interpolate", "--small", "{ws}/models/bin", "--large", L, "--out", "{ws}/o"],
     2, "pytorch_model.bin"),
    ("interp-large-no-config", "cbd", ["interpolate", "--small", S, "--large", "{ws}/models/nocfg", "--out", "{ws}/o"],
     2, "nocfg has no config.json"),
    ("interp-large-bad-config", "cbd", ["interpolate", "--small", S, "--large", "{ws}/models/badcfg", "--out", "{ws}/o"],
     2, "badcfg/config.json is not valid JSON"),
    ("interp-other-family", "cbd", ["interpolate", "--small", S, "--large", "{ws}/models/llama-other", "--out", "{ws}/o"],
     2, "bridge first"),
    ("interp-alpha-word", "cbd", INTERP + ["--out", "{ws}/o", "--alpha", "abc"], 2, "--alpha 'abc'"),
    ("interp-alpha-range", "cbd", INTERP + ["--out", "{ws}/o", "--alpha", "1.5"], 2, "alpha=1.5"),
    ("interp-layers-range", "cbd", INTERP + ["--out", "{ws}/o", "--layers", "9"], 2, "layers=9"),
    ("interp-heads-divide", "cbd", INTERP + ["--out", "{ws}/o", "--hidden", "48", "--heads", "5"], 2, "heads=5"),
    ("interp-calib-utf8", "cbd", INTERP + ["--out", "{ws}/o", "--calib", "{ws}/data/calib_bad.txt"], 2,
     "calib_bad.txt:3:8: not valid UTF-8"),
    ("interp-calib-json", "cbd", INTERP + ["--out", "{ws}/o", "--calib", "{ws}/data/calib_bad.jsonl"], 2,
     "calib_bad.jsonl:3: not valid JSON"),
    ("interp-layers-word", "cbd", INTERP + ["--out", "{ws}/o", "--layers", "abc"], 2, "invalid int value: 'abc'"),
    # cbd distill
    ("distill-student-truncated", "cbd", ["distill", "--teacher", T, "--student", "{ws}/models/trunc", "--data", GOOD,
                                          "--out", "{ws}/o"], 2, "is truncated"),
    ("distill-teacher-missing", "cbd", ["distill", "--teacher", "{ws}/nope", "--student", ST, "--data", GOOD,
                                        "--out", "{ws}/o"], 2, "nope does not exist"),
    ("distill-student-no-tokenizer", "cbd", ["distill", "--teacher", T, "--student", "{ws}/models/notok",
                                             "--data", GOOD, "--out", "{ws}/o"], 2, "notok has no tokenizer"),
    ("distill-data-utf8", "cbd", DISTILL[:-1] + ["{ws}/data/bad_utf8.jsonl", "--out", "{ws}/o"], 2,
     "bad_utf8.jsonl:3:21: not valid UTF-8 (byte 0xe9)"),
    ("distill-data-json", "cbd", DISTILL[:-1] + ["{ws}/data/bad_json.jsonl", "--out", "{ws}/o"], 2,
     "bad_json.jsonl:2: not valid JSON"),
    ("distill-data-field", "cbd", DISTILL[:-1] + ["{ws}/data/no_response.jsonl", "--out", "{ws}/o"], 2,
     "no_response.jsonl:2: record is missing field 'response'"),
    ("distill-data-json-list", "cbd", DISTILL[:-1] + ["{ws}/data/bad.json", "--out", "{ws}/o"], 2,
     "bad.json:3: not valid JSON"),
    ("distill-eval-data-utf8", "cbd", DISTILL + ["--eval-data", "{ws}/data/bad_utf8.jsonl", "--out", "{ws}/o"], 2,
     "bad_utf8.jsonl:3"),
    ("distill-data-missing", "cbd", DISTILL[:-1] + ["{ws}/data/none.jsonl", "--out", "{ws}/o"], 2, "none.jsonl"),
    ("distill-out-is-student", "cbd", DISTILL + ["--out", ST, "--overwrite"], 2, "is the student itself"),
    ("distill-out-user-dir", "cbd", DISTILL + ["--out", "{ws}/user", "--overwrite"], 2, "cbd-ray did not write"),
    ("distill-out-contains-data", "cbd", DISTILL + ["--out", "{ws}/data", "--overwrite"], 2, "contains the --data"),
    ("distill-config-dup-key", "cbd", DISTILL + ["--out", "{ws}/o", "--config", "{ws}/configs/grid_dup.yaml"], 2,
     "grid_dup.yaml:4: key 'alpha' repeats line 3"),
    ("distill-set-into-string", "cbd", DISTILL + ["--out", "{ws}/o", "--objective", "kd", "--set", "objective.x=1"], 2,
     "objective is a str"),
    ("distill-set-unknown", "cbd", DISTILL + ["--out", "{ws}/o", "--set", "warmpu=3"], 2, "warmpu: unknown key"),
    ("distill-storage-under-file", "cbd", DISTILL + ["--out", "{ws}/o", "--storage", "{ws}/user/notes.txt/ray"], 2,
     "notes.txt/ray cannot be written"),
    ("distill-steps-word", "cbd", DISTILL + ["--out", "{ws}/o", "--steps", "ten"], 2, "invalid int value: 'ten'"),
    # cbd evaluate: the output is checked before the evaluation runs
    ("eval-out-is-dir", "cbd", EVAL + ["--out", "{ws}/user", "--overwrite"], 2, "user is a directory"),
    ("eval-out-user-file-overwrite", "cbd", EVAL + ["--out", "{ws}/user/results.json", "--overwrite"], 2,
     "results.json is a file that cbd-ray did not write"),
    ("eval-out-exists", "cbd", EVAL + ["--out", "{ws}/results_ok.json"], 2, "--overwrite"),
    ("eval-out-inside-model", "cbd", EVAL + ["--out", S + "/res.json", "--overwrite"], 2, "lies inside the input"),
    ("eval-out-under-file", "cbd", EVAL + ["--out", "{ws}/user/notes.txt/res.json"], 2, "notes.txt is a file"),
    ("eval-model-truncated", "cbd", ["evaluate", "--model", "{ws}/models/trunc", "--tasks", "boolq"], 2, "truncated"),
    ("eval-model-missing", "cbd", ["evaluate", "--model", "{ws}/nope", "--tasks", "boolq"], 2, "nope does not exist"),
    ("eval-task-unknown", "cbd", ["evaluate", "--model", S, "--tasks", "quiz", "--no-progress"], 2, "quiz"),
    # cbd validate
    ("validate-dup-key", "cbd", ["validate", "{ws}/configs/dup.yaml"], 2, "dup.yaml:8: key 'name' repeats line 7"),
    ("validate-override-past-list", "cbd", ["validate", str(DEMO), "anchors.7.name=x"], 2, "index 7 is past the end"),
    ("validate-override-into-string", "cbd", ["validate", str(DEMO), "run.name.x=1"], 2, "run.name is a str"),
    ("validate-missing", "cbd", ["validate", "{ws}/configs/none.yaml"], 2, "none.yaml does not exist"),
    ("validate-bad-yaml", "cbd", ["validate", "{ws}/configs/tab.yaml"], 2, "tab.yaml:3"),
    ("validate-latin1", "cbd", ["validate", "{ws}/configs/latin1.yaml"], 2, "latin1.yaml: not valid UTF-8"),
    ("validate-storage-under-file", "cbd", ["validate", str(DEMO), "--storage", "{ws}/user/notes.txt/runs"], 2,
     "cannot be written"),
    # cbd report
    ("report-missing", "cbd", ["report", "{ws}/runs/none"], 2, "none does not exist"),
    ("report-not-a-run", "cbd", ["report", "{ws}/user"], 2, "no manifest.json"),
    ("report-manifest-list", "cbd", ["report", "{ws}/runs/listrun"], 2, "holds a JSON list, not an object"),
    ("report-manifest-bad-json", "cbd", ["report", "{ws}/runs/badrun"], 2, "manifest.json is not valid JSON"),
    ("report-evaluation-bad-json", "cbd", ["report", "{ws}/runs/badeval"], 2, "evaluation.json:3: not valid JSON"),
    # jobs/build_chain.py
    ("chain-dup-key", "build_chain", DUP_DEMO, 2, "key 'name' repeats line 7"),
    ("chain-override-past-list", "build_chain", ["--config", str(DEMO), "grid.targets.9.name=x"], 2,
     "index 9 is past the end of grid.targets"),
    ("chain-override-into-string", "build_chain", ["--config", str(DEMO), "run.storage.x=1"], 2, "run.storage is a str"),
    ("chain-missing-config", "build_chain", ["--config", "{ws}/configs/none.yaml"], 2, "none.yaml does not exist"),
    ("chain-storage-under-file", "build_chain", ["--config", str(DEMO), "--storage", "{ws}/user/notes.txt/runs"], 2,
     "cannot be written"),
    ("chain-unknown-key", "build_chain", ["--config", str(DEMO), "distill.stepz=3"], 2, "stepz"),
    # jobs/interpolate_grid.py
    ("grid-out-user-dir", "interpolate_grid", GRID + ["--out", "{ws}/user"], 2, "cbd-ray did not write"),
    ("grid-out-user-dir-overwrite", "interpolate_grid", GRID + ["--out", "{ws}/user", "--overwrite"], 2,
     "cbd-ray did not write"),
    ("grid-out-inside-anchor", "interpolate_grid", GRID + ["--out", L + "/grid"], 2, "lies inside the large anchor"),
    ("grid-alpha-word", "interpolate_grid", GRID + ["--out", "{ws}/o", "--alpha", "abc"], 2, "--alpha 'abc'"),
    ("grid-alpha-range", "interpolate_grid", GRID + ["--out", "{ws}/o", "--alpha", "2"], 2, "--alpha '2'"),
    ("grid-missing-grid", "interpolate_grid", GRID[:-1] + ["{ws}/configs/none.yaml", "--out", "{ws}/o"], 2,
     "none.yaml does not exist"),
    ("grid-dup-key", "interpolate_grid", GRID[:-1] + ["{ws}/configs/grid_dup.yaml", "--out", "{ws}/o"], 2,
     "key 'alpha' repeats line 3"),
    ("grid-small-truncated", "interpolate_grid", ["--small", "{ws}/models/trunc"] + GRID[2:] + ["--out", "{ws}/o"], 2,
     "is truncated"),
]

# a few run as real subprocesses: the installed entry points' boundary, end to end
SUBPROCESS = {"interp-out-contains-anchors", "validate-override-past-list", "chain-dup-key", "grid-out-user-dir"}


def _fill(argv: list[str], ws: Path) -> list[str]:
    return [a.replace("{ws}", str(ws)) for a in argv]


def _run_here(entry: str, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = cbd_main(argv) if entry == "cbd" else run_main(_job(entry).main, argv, prog=entry)
    except SystemExit as exc:  # argparse refuses a flag's value by exiting
        rc = exc.code
    return rc, capsys.readouterr().err


def _run_sub(entry: str, argv: list[str]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "cbd_ray.cli"] if entry == "cbd" else [sys.executable, str(ROOT / "jobs" / f"{entry}.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120, env=env)
    return p.returncode, p.stderr


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, ws, capsys):
    import ray

    name, entry, argv, code, text = case
    argv = _fill(argv, ws)
    before = tree_hash(ws)
    rc, err = _run_sub(entry, argv) if name in SUBPROCESS else _run_here(entry, argv, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse: its usage, then one error line
        lines = [lines[-1]]
    assert rc == code, err
    assert 1 <= len(lines) <= 2, err
    assert text in lines[-1] or text in lines[0], err
    assert "Traceback" not in err
    assert tree_hash(ws) == before, f"{name} changed the working tree"
    assert not ray.is_initialized(), f"{name} started Ray before refusing"
    if os.environ.get("DUMP_CASES"):  # a listing of every case's line, for the closing note
        with open(os.environ["DUMP_CASES"], "a") as f:
            f.write(f"{name} rc={rc}: {lines[-1]}\n")


def test_the_table_covers_every_entry_point_and_forty_cases():
    entries = {c[1] for c in CASES} | {c[2][0] for c in CASES if c[1] == "cbd"}
    assert {"build_chain", "interpolate_grid", "interpolate", "distill", "evaluate", "validate", "report"} <= entries
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------ beyond the table


def test_a_truncated_earlier_output_is_rebuilt_not_reused(ws, tmp_path, capsys):
    s, l = ws / "anchors" / "gpt2-small", ws / "anchors" / "gpt2-large"
    argv = ["interpolate", "--small", str(s), "--large", str(l), "--out", str(tmp_path / "t"), "--layers", "3"]
    assert cbd_main(argv) == 0
    weights = tmp_path / "t" / "model.safetensors"
    original = weights.read_bytes()
    assert cbd_main(argv) == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["reused"] is True
    weights.write_bytes(original[:-64])  # a cut-short copy: cbd.json and the file's name are intact
    assert cbd_main(argv) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "reused" not in record and weights.read_bytes() == original


def test_outputs_are_readable_as_the_umask_allows(ws, tmp_path):
    from cbd_ray.storage import atomic_directory, atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_directory(tmp_path / "d") as d:
            (d / "f.bin").write_bytes(b"x")
            os.chmod(d / "f.bin", 0o600)  # as mkstemp or a copy of a private file leaves it
    finally:
        os.umask(old)
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d" / "f.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o666 & ~old
    made = ws / "made"
    assert all(f.stat().st_mode & 0o044 == 0o044 & ~old for f in made.iterdir())


def test_report_on_a_run_without_evaluation_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"version": 1, "stages": {"grid": {"status": "done"}}}))
    assert cbd_main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "no evaluation.json" in err and "no held-out loss section" in err and (run / "report.md").is_file()


def test_the_boundary_exit_codes_and_a_bug_keeps_its_traceback(capsys):
    from cbd_ray.pipeline import StageFailed

    def fail(exc):
        def main(argv):
            raise exc
        return main

    assert run_main(fail(StageFailed("chain_1", "RuntimeError: boom")), prog="x") == 1
    assert "x: error: stage 'chain_1' failed: RuntimeError: boom" in capsys.readouterr().err
    assert run_main(fail(KeyboardInterrupt()), prog="x") == 130
    assert run_main(fail(OSError(28, "No space left on device", "/runs/x")), prog="x") == 1
    assert capsys.readouterr().err.splitlines()[-1] == "x: error: No space left on device: /runs/x"
    assert run_main(fail(NotADirectoryError(20, "Not a directory", "/a/b")), prog="x") == 2
    with pytest.raises(ZeroDivisionError):
        run_main(fail(ZeroDivisionError("a bug")), prog="x")


def test_model_checks_catch_a_missing_shard_and_a_corrupt_header(ws, tmp_path):
    from cbd_ray.checks import check_model_dir
    from cbd_ray.errors import CheckpointError

    d = tmp_path / "sharded"
    shutil.copytree(ws / "anchors" / "gpt2-small", d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        check_model_dir(d, "teacher")
    (d / "model.safetensors.index.json").unlink()
    (d / "model-00001-of-00002.safetensors").write_bytes((12).to_bytes(8, "little") + b"{not json}  " + b"\0" * 64)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        check_model_dir(d, "teacher")
    assert check_model_dir(ws / "anchors" / "gpt2-small", "student") == ws / "anchors" / "gpt2-small"


def test_a_grid_out_gets_our_marker_only_when_work_starts(tmp_path):
    job = _job("interpolate_grid")
    out = tmp_path / "g"
    job.claim_out(out, (), "interpolation grid")
    assert json.loads((out / "cbd.json").read_text())["format"] == "cbd-ray interpolation grid"
    (out / "t1").mkdir()
    job.claim_out(out, (), "interpolation grid")  # a grid this job made is written again
    user = tmp_path / "u"
    user.mkdir()
    (user / "grid.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        job.claim_out(user, (), "interpolation grid")
    assert (user / "grid.json").read_text() == "{}"
