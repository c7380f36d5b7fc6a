"""Two real chain drivers on one run directory: the second, started while the first runs,
must be refused by the run directory's lease (cbd_ray.lease) before it starts Ray, and the
first must finish untouched.

    python bench/two_drivers.py [--delay 20] [--config configs/smoke.yaml] [--out bench/out/two_drivers.json]

Each driver is ``python jobs/build_chain.py --config CONFIG --storage TMP`` with its own
in-process Ray. Prints one JSON line: each driver's return code and wall time, the second's
refusal line, whether it started Ray, and whether the first finished (every stage done,
report written, lease released). Holds /tmp/cbd_ray_tests.lock like the test suite, so it
never runs beside another local Ray on this machine (two clusters break Ray Train).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _start(config: str, storage: Path, log: Path) -> tuple[subprocess.Popen, float, object]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each driver: its own local Ray
    env.update(ENV)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/cbd_ray/torch_extensions"))
    out = open(log, "w")
    cmd = [sys.executable, str(ROOT / "jobs" / "build_chain.py"), "--config", config, "--storage", str(storage)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), time.perf_counter(), out


def _finished(run_dir: Path) -> bool:
    """Every stage of the first driver's run done, its report written, its lease released."""
    try:
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return False
    return (bool(stages) and all(s.get("status") == "done" for s in stages.values())
            and (run_dir / "report.md").is_file() and not (run_dir / ".lease.json").exists())


def run(config: str, delay: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="two-drivers-") as tmp:
        storage = Path(tmp) / "runs"
        first, t1, f1 = _start(config, storage, Path(tmp) / "first.log")
        time.sleep(delay)
        second, t2, f2 = _start(config, storage, Path(tmp) / "second.log")
        rc2 = second.wait(timeout=timeout)
        wall2 = time.perf_counter() - t2
        first_alive_when_refused = first.poll() is None
        rc1 = first.wait(timeout=timeout)
        wall1 = time.perf_counter() - t1
        f1.close(), f2.close()
        log2 = (Path(tmp) / "second.log").read_text()
        errors = [line for line in log2.splitlines() if "error:" in line]
        run_dir = storage / Path(config).stem
        log1 = (Path(tmp) / "first.log").read_text()
        return {"first": {"rc": rc1, "wall_s": round(wall1, 1), "finished": _finished(run_dir),
                          "started_ray": "Started a local Ray instance" in log1},
                "second": {"rc": rc2, "wall_s": round(wall2, 1), "started_after_s": delay,
                           "refusal": errors[-1] if errors else None,
                           "started_ray": "Started a local Ray instance" in log2},
                "first_running_when_second_refused": first_alive_when_refused,
                "first_tail": log1.splitlines()[-1:] if rc1 else []}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--delay", type=float, default=20.0, help="seconds between the two starts")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds either driver may take")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "two_drivers.json"))
    a = p.parse_args()
    with open("/tmp/cbd_ray_tests.lock", "w") as lock:
        t0 = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)  # no other local Ray on this machine meanwhile
        waited = time.perf_counter() - t0
        result = run(a.config, a.delay, a.timeout)
    result["waited_for_machine_lock_s"] = round(waited, 1)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    line = json.dumps(result, sort_keys=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(line + "\n")
    print(line, flush=True)
    ok = result["second"]["rc"] == 2 and not result["second"]["started_ray"] and result["first"]["finished"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
