"""What a chain run spent and made, from its run directory alone: the teacher-cost table
and report.md (used by the report stage and by ``cbd report RUN_DIR``).

The teacher-cost table lists each stage's teacher tokens (tokens a teacher model
processed: forward passes for distillation, prompt + answer for the bridge's sampling),
student tokens and wall time, then what distilling every target directly from the source
would have cost at the same token budget: N targets × the budget of the chain's first step
(the step the source teaches). The ratio is the paper's efficiency claim as a number.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from cbd_ray.manifest import Manifest
from cbd_ray.pipeline import StageContext


def cost_rows(manifest: Manifest, n_targets: int | None = None) -> list[dict[str, Any]]:
    """One row per stage (stage, teacher, teacher_tokens, student_tokens, wall_s, status),
    then ``chain total`` and ``direct`` rows. ``n_targets`` defaults to the targets the grid
    stage recorded."""
    rows: list[dict[str, Any]] = []
    for name, rec in ordered_stages(manifest):
        if name in ("report", "baselines"):  # the report describes the stages before it; baselines are not the chain
            continue
        rows.append({"stage": name, "teacher": rec.get("teacher") or "", "status": rec.get("status"),
                     "teacher_tokens": int(rec.get("teacher_tokens") or 0),
                     "student_tokens": int(rec.get("student_tokens") or 0),
                     "wall_s": float(rec.get("wall_s") or 0.0)})
    if n_targets is None:
        n_targets = int(((manifest.get("grid") or {}).get("metrics") or {}).get("targets") or 0)
    chain_steps = [r for r in rows if r["stage"].startswith("chain_")]
    budget = chain_steps[0]["teacher_tokens"] if chain_steps else 0
    total = {"stage": "chain total", "teacher": "all", "status": "",
             "teacher_tokens": sum(r["teacher_tokens"] for r in rows),
             "student_tokens": sum(r["student_tokens"] for r in rows),
             "wall_s": round(sum(r["wall_s"] for r in rows), 3)}
    student_budget = chain_steps[0]["student_tokens"] if chain_steps else 0
    kd = manifest.get("baselines") or {}
    measured = (kd.get("metrics") or {}).get("direct_kd_teacher_tokens")
    if measured:  # Direct KD ran for every target (the baselines stage): its measured spend
        direct = {"stage": f"direct: {n_targets} targets, measured (baselines stage)", "teacher": "source",
                  "status": "", "teacher_tokens": int(measured), "student_tokens": 0, "wall_s": None}
    else:
        direct = {"stage": f"direct: {n_targets} targets x {budget:,} (estimate: the first step's budget each)",
                  "teacher": "source", "status": "", "teacher_tokens": n_targets * budget,
                  "student_tokens": n_targets * student_budget, "wall_s": None}
    return rows + [total, direct]


def ordered_stages(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """The manifest's stage records in pipeline order (the run's ``order``, then by start)."""
    order = {n: i for i, n in enumerate(manifest.data.get("order") or [])}
    items = list(manifest.stages.items())
    return sorted(items, key=lambda kv: (order.get(kv[0], len(order)), kv[1].get("started") or ""))


def savings(rows: Sequence[dict[str, Any]]) -> float | None:
    """Direct teacher tokens / chain teacher tokens (None when the chain spent none)."""
    total = next((r for r in rows if r["stage"] == "chain total"), None)
    direct = next((r for r in rows if r["stage"].startswith("direct:")), None)
    if not total or not direct or not total["teacher_tokens"]:
        return None
    return direct["teacher_tokens"] / total["teacher_tokens"]


def format_cost_table(rows: Sequence[dict[str, Any]]) -> str:
    """The teacher-cost table as fixed-width text (printed at the end of the job)."""
    head = ("stage", "teacher", "teacher tokens", "student tokens", "wall time")
    body = []
    for r in rows:
        wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.1f}s"
        body.append((r["stage"], r.get("teacher") or "-", f"{r['teacher_tokens']:,}", f"{r['student_tokens']:,}", wall))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = ["teacher cost", fmt(head), fmt(tuple("-" * w for w in widths))]
    for k, b in enumerate(body):
        if rows[k]["stage"] == "chain total":
            lines.append(fmt(tuple("-" * w for w in widths)))
        lines.append(fmt(b))
    ratio = savings(rows)
    if ratio is not None:
        lines.append(f"direct distillation of every target would need {ratio:.2f}x the teacher tokens of the chain")
    return "\n".join(lines)


def _heldout_section(evaluation: list[dict[str, Any]], plots: Path) -> Any:
    """The held-out loss table and plot: anchors and targets, random init, and the targets'
    baselines (Prune, Direct KD) when the run made them."""
    from cbd_ray.report import Section, markdown_table, plot_scores_by_size

    ev_rows = []
    for r in evaluation:
        row = {"model": r["model"], "kind": r["kind"], "params": r["params"], "pair": r.get("pair", ""),
               "alpha": r.get("alpha"), "heldout_nll": r["heldout_nll"], "random_nll": r["random_nll"],
               "gain": r["random_nll"] - r["heldout_nll"],
               **{k: r[k] for k in ("prune_nll", "direct_kd_nll") if k in r}}
        for t in r.get("tasks") or []:
            for k, v in t["metrics"].items():
                if isinstance(v, (int, float)) and not k.endswith("_stderr"):
                    row[f"{t['task']}.{k}"] = v
        ev_rows.append(row)
    ev_rows.sort(key=lambda r: (r["kind"] != "anchor", -r["params"]))
    plot_rows = []
    for r in ev_rows:
        plot_rows.append({"params": r["params"], "heldout_nll": r["heldout_nll"], "method": r["kind"] + "s"})
        if r["kind"] == "target":
            plot_rows.append({"params": r["params"], "heldout_nll": r["random_nll"], "method": "random init"})
            for k, label in (("prune_nll", "Prune (source cut to shape)"), ("direct_kd_nll", "Direct KD")):
                if k in r:
                    plot_rows.append({"params": r["params"], "heldout_nll": r[k], "method": label})
    png = plot_scores_by_size(plot_rows, "heldout_nll", plots / "heldout_loss.png",
                              title="held-out loss (nats/token) by size")
    better = sum(r["heldout_nll"] < r["random_nll"] for r in ev_rows if r["kind"] == "target")
    n_t = sum(r["kind"] == "target" for r in ev_rows)
    return Section(
        "Held-out loss",
        f"Mean token NLL on held-out text; `random_nll` is a random initialisation of the same config"
        + ("; `prune_nll` the source cut straight to the target's shape; `direct_kd_nll` a random init of that "
           "shape distilled straight from the source with the first chain step's budget"
           if any("prune_nll" in r or "direct_kd_nll" in r for r in ev_rows) else "")
        + f". {better} of {n_t} targets start better than random.\n\n" + markdown_table(ev_rows),
        images=[png])


def _with_baselines(evaluation: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation rows with each target's baseline losses (``prune_nll``, ``direct_kd_nll``)."""
    by = {(b["target"], b["method"]): b["heldout_nll"] for b in baselines}
    out = []
    for r in evaluation:
        r = dict(r)
        for m in ("prune", "direct_kd"):
            if r.get("kind") == "target" and (r["model"], m) in by:
                r[f"{m}_nll"] = by[(r["model"], m)]
        out.append(r)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 1)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_run_report(run_dir: str | os.PathLike, manifest: Manifest | None = None,
                     evaluation_dir: str | os.PathLike | None = None, grid_dir: str | os.PathLike | None = None,
                     out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/report.md`` (and a copy in ``out_dir``) with the chain, the targets'
    held-out loss against random initialisation, the teacher-cost table, and PNG plots.
    Everything comes from the run directory's JSON files."""
    from cbd_ray.export import exports_section
    from cbd_ray.report import Section, markdown_table, plot_bar, write_report

    run = Path(run_dir)
    manifest = manifest or Manifest.load(run)
    if not manifest.stages:
        raise FileNotFoundError(f"{run} has no manifest.json with stages: not a chain run directory")
    ev_dir = Path(evaluation_dir) if evaluation_dir else run / "evaluation"
    gr_dir = Path(grid_dir) if grid_dir else run / "targets"
    plots = run / "plots"  # linked from report.md by a path relative to the run directory
    plots.mkdir(parents=True, exist_ok=True)
    evaluation = _with_baselines(_load_json(ev_dir / "evaluation.json") or [],
                                 _load_json(run / "baselines" / "baselines.json") or [])
    targets = _load_json(gr_dir / "targets.json") or []
    rows = cost_rows(manifest, n_targets=len(targets) or None)
    sections: list[Section] = []

    ident = manifest.identity() or {}
    stage_rows = [{"stage": n, "status": r.get("status"), "wall_s": _round(r.get("wall_s")),
                   "finished": (r.get("finished") or "")[:19].replace("T", " "),
                   "error": (r.get("error") or "")[:120]} for n, r in ordered_stages(manifest) if n != "report"]
    sections.append(Section("Stages", f"Run `{ident.get('name', run.name)}` in `{run}`.\n\n"
                            + markdown_table(stage_rows, ["stage", "status", ("wall_s", "wall s"), "finished", "error"],
                                             digits=1)))
    if evaluation:
        sections.append(_heldout_section(evaluation, plots))
    cost_png = None
    direct = rows[-1]["teacher_tokens"]
    chain_total = rows[-2]["teacher_tokens"]
    if direct or chain_total:
        cost_png = plot_bar({"chain (all stages)": chain_total, "direct (N x budget)": direct},
                            plots / "teacher_tokens.png", title="teacher tokens")
    ratio = savings(rows)
    note = (f"Direct distillation of every target from the source would need {ratio:.2f}x the teacher tokens "
            f"the chain spent.\n\n" if ratio else "")
    sections.append(Section("Teacher cost", note + markdown_table(
        [{**r, "wall_s": _round(r["wall_s"])} for r in rows],
        ["stage", "teacher", ("teacher_tokens", "teacher tokens"), ("student_tokens", "student tokens"),
         ("wall_s", "wall s")], digits=1), images=[cost_png] if cost_png else []))
    if targets:
        sections.append(Section("Targets", markdown_table(
            [{"target": t["name"], "shape": "x".join(str(t["shape"].get(k)) for k in ("layers", "hidden", "heads")),
              "params": t.get("params"), "alpha": t.get("alpha"), "between": f"{t.get('large')} > {t.get('small')}",
              "path": f"targets/{t.get('path')}"} for t in targets])))
    sections += exports_section(run)
    path = write_report(run, sections, title=f"Chain report: {ident.get('name', run.name)}")
    if out_dir is not None:
        (Path(out_dir) / "report.md").write_text(path.read_text())
    return path


def report_stage(cfg: Any) -> Callable[[StageContext], dict[str, Any]]:
    """The chain's ``report`` stage: :func:`write_run_report` over the run directory."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        ctx.out.mkdir(parents=True)
        path = write_run_report(ctx.run_dir, manifest=Manifest.load(ctx.run_dir), evaluation_dir=ctx.inputs["evaluate"],
                                grid_dir=ctx.inputs["grid"], out_dir=ctx.out)
        return {"report": str(path.relative_to(ctx.run_dir)), "student_tokens": 0, "teacher_tokens": 0}

    return fn
