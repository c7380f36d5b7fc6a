"""Print the markdown tables of docs/results.md from the committed files in docs/results/.

    python docs/results/tables.py > /tmp/tables.md
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pm(r: dict, k: str, d: int = 3) -> str:
    m, s = r.get(f"{k}_mean"), r.get(f"{k}_std")
    return "–" if m is None else f"{m:.{d}f} ± {s:.{d}f}"


def main() -> None:
    summary = json.loads((HERE / "summary.json").read_text())
    print("| target | params | method | test loss at init | after fine-tuning | Δ vs Rand | steps to Rand's final | seeds reaching it |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in summary:
        print(f"| {r['target']} | {r['params']:,} | {r['label']} | {pm(r, 'initial_loss')} | {pm(r, 'final_loss')} | "
              f"{pm(r, 'delta_vs_rand')} | {pm(r, 'steps_to_rand', 1)} | {r['reached']} |")
    print()
    rows = json.loads((HERE / "results.json").read_text())
    kd = [r for r in rows if r["method"] == "direct_kd"]
    for t in dict.fromkeys(r["target"] for r in kd):
        ks = [r["teacher_tokens"] for r in kd if r["target"] == t]
        print(f"- Direct KD {t}: teacher tokens per seed {ks}")
    man = json.loads((HERE / "chain" / "manifest.json").read_text())
    for n, s in man["stages"].items():
        print(f"- chain stage {n}: teacher {s.get('teacher_tokens')}, student {s.get('student_tokens')}, "
              f"wall {s.get('wall_s')}")
    al = HERE / "alignment" / "alignment_sweep.json"
    if al.is_file():
        print()
        a = json.loads(al.read_text())
        alphas = sorted({r["alpha"] for r in a})
        print("| pair | target | align | " + " | ".join(f"α={x:g}" for x in alphas) + " |")
        print("|---|---|---|" + "---:|" * len(alphas))
        for key in dict.fromkeys((r["pair"], r["target"], r["align"]) for r in a):
            v = {r["alpha"]: r["loss"] for r in a if (r["pair"], r["target"], r["align"]) == key}
            print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{v[x]:.3f}" for x in alphas) + " |")


if __name__ == "__main__":
    main()
