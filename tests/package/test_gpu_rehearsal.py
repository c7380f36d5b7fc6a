"""bench/gpu_rehearsal.py at tiny shapes on CPU: the one-command GPU rehearsal keeps running
(every section, finite figures) while no GPU is lent to run it for real."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import ROOT


REQUIRED = {
    "kd_step": ["naive_tokens_per_s", "ours_tokens_per_s", "naive_peak_mb", "ours_peak_mb", "loss_abs_diff",
                "naive_first_loss", "ours_first_loss"],
    "rollouts": ["compiled_tokens_per_s", "eager_tokens_per_s", "generate_tokens_per_s", "compiled_first_call_s",
                 "generate_agree_with_eager"],
    "minillm": ["steps_done", "first_step_s", "rollout_step_s", "update_step_s", "peak_mb", "plan_total_mb",
                "first_loss", "last_loss"],
}


def _numbers(x, path=""):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")


def test_tiny_rehearsal_prints_one_json_line_with_every_section(tmp_path):
    out = tmp_path / "rehearsal.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_rehearsal.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    res = json.loads(line)
    assert json.loads(out.read_text()) == res
    assert res["bench"] == "gpu_rehearsal" and res["tiny"] and res["device"] == "cpu"
    for section, keys in REQUIRED.items():
        got = res[section]
        assert got["status"] == "ok", (section, got.get("error"), proc.stderr[-3000:])
        for k in keys:
            assert isinstance(got[k], (int, float)) and not isinstance(got[k], bool), (section, k, got.get(k))
    bad = [(p, v) for p, v in _numbers(res) if not math.isfinite(v)]
    assert not bad, bad
    assert res["minillm"]["steps_done"] == 20 and res["minillm"]["plan_total_mb"] > 0
    assert res["minillm"]["plan_parts_mb"]  # the memory plan's parts, beside the measured peak
    assert res["rollouts"]["generate_agree_with_eager"] == 1.0  # greedy: the same tokens as generate
