"""Print the tables of docs/results.md's "paper's path" section from the committed files in
docs/results/paperpath/ (the comparison's summary.json, results.json and chain manifest).

    python docs/results/paper_tables.py [docs/results/paperpath]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = (("initial_loss", "Dolly test loss at init", False), ("final_loss", "Dolly test loss after fine-tuning", False),
           ("dolly.rougeL", "Rouge-L (Dolly eval)", True), ("second_loss", "TinyShakespeare loss", False))


def pm(r: dict, k: str, d: int = 3) -> str:
    m, s = r.get(f"{k}_mean"), r.get(f"{k}_std")
    return "–" if m is None else f"{m:.{d}f} ± {s:.{d}f}"


def table(summary: list[dict]) -> None:
    print("| target | method | params | " + " | ".join(label for _, label, _ in METRICS) + " |")
    print("|---|---|---:|" + "---:|" * len(METRICS))
    for r in summary:
        print(f"| {r['target']} | {r['label']} | {r['params']:,} | "
              + " | ".join(pm(r, k, 4 if k == "dolly.rougeL" else 3) for k, _, _ in METRICS) + " |")


def verdicts(summary: list[dict], ref: str = "cbd") -> None:
    """Per target and metric: each method against ``ref``; a gap is clear when larger than the two stds."""
    for t in dict.fromkeys(r["target"] for r in summary):
        rows = {r["method"]: r for r in summary if r["target"] == t}
        c = rows.get(ref)
        if c is None:
            continue
        print(f"\n{t} ({c['label']} α={c.get('alpha')}, {c.get('from')}):")
        for k, label, higher in METRICS:
            if c.get(f"{k}_mean") is None:
                continue
            wins, loses = [], []
            for m, r in rows.items():
                if m == ref or r.get(f"{k}_mean") is None:
                    continue
                d = r[f"{k}_mean"] - c[f"{k}_mean"]
                better = d < 0 if not higher else d > 0
                clear = abs(d) > r[f"{k}_std"] + c[f"{k}_std"]
                (loses if better else wins).append(f"{r['label']} {r[f'{k}_mean']:.3f}{'' if clear else ' (within stds)'}")
            print(f"- {label}: {c['label']} {c[f'{k}_mean']:.3f}; beats {len(wins)}: {', '.join(wins) or '-'}; "
                  f"**loses to {len(loses)}**: {', '.join(loses) or '-'}")


def costs(root: Path, summary: list[dict]) -> None:
    man = json.loads((root / "chain" / "manifest.json").read_text())
    print("\n| stage | student tokens | teacher tokens | wall s |\n|---|---:|---:|---:|")
    for n, s in man["stages"].items():
        m = s.get("metrics") or {}
        print(f"| {n} | {int(m.get('student_tokens') or 0):,} | {int(m.get('teacher_tokens') or 0):,} | "
              f"{s.get('wall_s') or ''} |")
    for k in ("teacher_tokens", "anchor_teacher_tokens", "pretrain_tokens"):
        for r in summary:
            if r.get(f"{k}_mean"):
                print(f"- {r['target']} {r['label']}: {k} {r[f'{k}_mean']:,.0f} (mean over seeds)")


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "paperpath"
    summary = json.loads((root / "summary.json").read_text())
    table(summary)
    verdicts(summary)
    if any(r["method"] == "cbd_recover" for r in summary):
        verdicts(summary, "cbd_recover")
    costs(root, summary)


if __name__ == "__main__":
    main()
