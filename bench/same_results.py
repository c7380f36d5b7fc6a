"""Do two revisions of cbd-ray give the same results? Runs a chain config (or a comparison
config) at each revision, from a git worktree of it, on its own local Ray, one after the
other, and compares what the runs made: every model's weights by sha256, evaluation.json,
every target's α and each training stage's loss at every checkpoint (a comparison run: every
(target, method, seed) row's losses, α and curve, and the searched α).

    python bench/same_results.py --old 1fede78 --new HEAD --config configs/smoke.yaml
    python bench/same_results.py --old 1fede78 --new HEAD --config configs/reproduce_tiny.yaml --job reproduce

The config file is read from this checkout for both revisions, so both run the same config.
Prints one line per fact, then one JSON line, and exits 1 when any differs. Work goes under --work (default: a
temp dir), which is kept for inspection.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _weights(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): _sha(p) for p in sorted(run.rglob("model.safetensors"))
            if "work" not in p.relative_to(run).parts and not p.relative_to(run).parts[0].startswith(".")}


def chain_facts(run: Path) -> dict:
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    targets = run / "targets" / "targets.json"
    return {
        "weights": _weights(run),
        "evaluation": json.loads((run / "evaluation" / "evaluation.json").read_text()),
        "alpha": {t["name"]: t.get("alpha") for t in json.loads(targets.read_text())} if targets.is_file() else {},
        "losses": {k: [c.get("loss") for c in (v.get("metrics") or {}).get("checkpoints", [])]
                   for k, v in stages.items()},
    }


def reproduce_facts(run: Path) -> dict:
    rows = {f"{r['target']}/{r['method']}/{r['seed']}": {k: r.get(k) for k in
                                                         ("status", "initial_loss", "final_loss", "alpha", "eval_curve")}
            for r in json.loads((run / "results.json").read_text())}
    return {"rows": rows, "best_alpha": json.loads((run / "chain" / "tune" / "best_alpha.json").read_text()),
            "chain weights": _weights(run / "chain")}


def _run(rev: str, config: Path, job: str, work: Path) -> Path:
    src = work / f"src-{rev}"
    if not src.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), rev], check=True,
                       capture_output=True)
    storage = work / f"runs-{rev}"
    env = {**os.environ, **ENV, "PYTHONPATH": str(src)}
    env.pop("RAY_ADDRESS", None)
    log = work / f"{rev}.log"
    print(f"[same_results] {rev}: {job} {config.name} -> {storage} (log {log})", flush=True)
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, f"jobs/{job}.py", "--config", str(config), "--storage", str(storage)],
                            cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{rev}: the run failed ({rc}); see {log}")
    import yaml

    return storage / yaml.safe_load(config.read_text())["run"]["name"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--job", choices=("build_chain", "reproduce"), default="build_chain")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cbd-same-results-"))
    work.mkdir(parents=True, exist_ok=True)
    config = args.config.resolve()
    facts = chain_facts if args.job == "build_chain" else reproduce_facts
    old, new = (facts(_run(rev, config, args.job, work)) for rev in (args.old, args.new))
    verdict = {key: old[key] == new[key] for key in old}
    for key, ok in verdict.items():
        print(f"{key:14s} {'same' if ok else 'DIFFERENT'} ({len(old[key])} entries)")
    same = all(verdict.values())
    print(json.dumps({"bench": "same_results", "old": args.old, "new": args.new, "config": str(args.config),
                      "same": same, **verdict, "work": str(work)}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
