"""Building blocks of the run report: markdown tables and PNG plots (matplotlib, Agg).

Every function takes plain Python data (rows of dicts, lists of points), so a report can
be regenerated from the JSON files of a run directory alone, without models or Ray.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbd_ray.errors import CBDError
from cbd_ray.storage import atomic_write_text

Column = str | tuple[str, str]  # key, or (key, header)


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def human_count(n: float) -> str:
    """1_380_000 -> "1.38M"; 138e6 -> "138M"; 2.5e9 -> "2.5B"."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] | None = None,
                   digits: int = 4) -> str:
    """A GitHub markdown table; ``columns`` are keys or (key, header) pairs (default: the keys
    of all rows in first-seen order). Missing cells are blank; floats get ``digits`` decimals;
    numeric columns are right-aligned."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    if not cols:
        raise CBDError("a table needs at least one column")
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) and rows
               for k, _ in cols]
    head = "| " + " | ".join(h for _, h in cols) + " |"
    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), digits) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and Ray workers
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_png: str | os.PathLike) -> Path:
    import io

    from cbd_ray.storage import atomic_write_bytes

    out = Path(out_png)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def plot_scores_by_size(rows: Sequence[Mapping[str, Any]], metric: str, out_png: str | os.PathLike,
                        x: str = "params", group: str = "method", title: str | None = None,
                        logx: bool = False) -> Path:
    """One line per ``group`` value (a method), ``metric`` against ``x`` (parameter count).

    rows: dicts holding at least ``x``, ``group`` and ``metric``; rows lacking the metric are
    skipped. Raises when no row has it."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(metric) is None or r.get(x) is None:
            continue
        series.setdefault(str(r.get(group, "")), []).append((float(r[x]), float(r[metric])))
    if not series:
        raise CBDError(f"no row has both {x!r} and {metric!r} to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    if x == "params":  # 1.4e8 -> "140M"
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_count(v)))
    ax.set_xlabel("parameters" if x == "params" else x)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by model size")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], out_png: str | os.PathLike,
                xlabel: str = "step", ylabel: str = "loss", title: str | None = None,
                logy: bool = False, markers: bool = False) -> Path:
    """Curves (loss against step, a metric against α, ...): {name: [(x, y), ...]}."""
    if not curves or not any(len(v) for v in curves.values()):
        raise CBDError("no curve has any point to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o" if markers or len(xs) < 12 else None, label=str(name))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def plot_bar(values: Mapping[str, float] | Mapping[str, Mapping[str, float]], out_png: str | os.PathLike,
             ylabel: str = "teacher tokens", title: str | None = None, logy: bool = False) -> Path:
    """Bars: {label: value}, or grouped {label: {series: value}} (e.g. teacher tokens spent by
    the chain against distilling every target directly)."""
    if not values:
        raise CBDError("no value to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(values) + 2), 4))
    labels = list(values)
    first = values[labels[0]]
    if isinstance(first, Mapping):
        series = list(dict.fromkeys(s for v in values.values() for s in v))  # type: ignore[union-attr]
        width = 0.8 / len(series)
        for i, s in enumerate(series):
            ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(labels))],
                   [float(values[lab].get(s, 0.0)) for lab in labels], width, label=s)  # type: ignore[union-attr]
        ax.legend()
    else:
        ax.bar(range(len(labels)), [float(values[lab]) for lab in labels])  # type: ignore[arg-type]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_png)


@dataclass
class Section:
    """One part of a report: a heading, markdown text, and images (paths) shown under it."""

    title: str
    body: str = ""
    images: list[str | os.PathLike] = field(default_factory=list)


def write_report(run_dir: str | os.PathLike, sections: Sequence[Section | Mapping[str, Any]],
                 title: str = "Report", name: str = "report.md") -> Path:
    """Write ``run_dir/name`` (regenerated each call) from ``sections``; images are linked by
    their path relative to ``run_dir`` and must exist. Returns the report's path."""
    run = Path(run_dir)
    lines = [f"# {title}", ""]
    for sec in sections:
        s = sec if isinstance(sec, Section) else Section(**sec)
        lines += [f"## {s.title}", ""]
        if s.body:
            lines += [s.body.rstrip("\n"), ""]
        for img in s.images:
            p = Path(img)
            p = p if p.is_absolute() else run / p
            if not p.is_file():
                raise FileNotFoundError(f"image {p} for section {s.title!r} does not exist")
            rel = os.path.relpath(p, run)
            lines += [f"![{p.stem}]({Path(rel).as_posix()})", ""]
    out = run / name
    atomic_write_text(out, "\n".join(lines))
    return out
