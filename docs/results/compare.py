"""Where CBD wins and loses, per target, from the committed summary.json: at init and after
fine-tuning, each method against CBD, with "clear" meaning the gap is larger than the two
stds together.

    python docs/results/compare.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    summary = json.loads((HERE / "summary.json").read_text())
    for t in dict.fromkeys(r["target"] for r in summary):
        rows = {r["method"]: r for r in summary if r["target"] == t}
        cbd = rows["cbd"]
        print(f"## {t} (CBD α={cbd.get('alpha')}, from {cbd.get('from')})")
        for key in ("initial_loss", "final_loss"):
            best = min(rows.values(), key=lambda r: r[f"{key}_mean"])
            print(f"- {key}: best {best['label']} {best[f'{key}_mean']:.3f}")
            for m, r in rows.items():
                if m == "cbd":
                    continue
                d = r[f"{key}_mean"] - cbd[f"{key}_mean"]
                clear = abs(d) > r[f"{key}_std"] + cbd[f"{key}_std"]
                verdict = ("CBD wins" if d > 0 else "CBD loses") + ("" if clear else " (within stds)")
                print(f"  - vs {r['label']}: {r[f'{key}_mean']:.3f} vs CBD {cbd[f'{key}_mean']:.3f} "
                      f"({d:+.3f}) {verdict}")


if __name__ == "__main__":
    main()
