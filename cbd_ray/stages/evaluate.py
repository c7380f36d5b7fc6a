"""Evaluate many models on Ray: a pool of Ray tasks, one model loaded per worker.

The driver checks every task name, data file and model directory, reads the task data
once and puts it in the object store; then one Ray task per model loads that model,
scores every task and returns its rows. The driver shows progress (one line per finished
model, and a bar over models) and writes, into the output directory,

* ``<name>.json``: settings and the results of each task (the form ``evaluate_model`` returns),
* ``<name>.md``: the same as a markdown table (task, metric, value, stderr, examples),
* ``summary.json`` / ``summary.md``: one row per model, one column per task metric, and
  ``summary.png``: the accuracies and Rouge-L of every model side by side.

A model whose ``<name>.json`` already holds the same settings is not evaluated again
(a rerun resumes); one with other settings is an error unless ``overwrite`` is set.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cbd_ray.errors import CBDError
from cbd_ray.report import markdown_table
from cbd_ray.session import connect_ray
from cbd_ray.storage import atomic_write_json, atomic_write_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _evaluate_one(name: str, model_dir: str, specs: list[str], prepared: dict[str, Any], settings: dict[str, Any],
                  device: str) -> list[dict[str, Any]]:
    """Runs inside a Ray worker: load one model, score every task."""
    from cbd_ray.evaluate import evaluate_loaded, load_model

    model, tokenizer = load_model(model_dir, device)
    rows = evaluate_loaded(model, tokenizer, specs, limit=settings["limit"], batch_size=settings["batch_size"],
                           shots=settings["shots"], max_new_tokens=settings["max_new_tokens"], progress=False,
                           model_name=name, prepared=prepared)
    for r in rows:  # one line per task in the driver's log (Ray forwards worker output)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items() if not k.endswith("_stderr"))
        print(f"[evaluate] {name} {r['task']}: {shown} (n={r['n']}, {r['seconds']:.1f}s)", flush=True)
    return rows


def model_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of one model's results: task, metric, value, stderr, examples."""
    rows = []
    for r in results:
        for k, v in r["metrics"].items():
            if k.endswith("_stderr"):
                continue
            rows.append({"task": r["task"], "metric": k, "value": v,
                         "stderr": r["metrics"].get(f"{k}_stderr"), "n": r["n"]})
    return markdown_table(rows, ["task", "metric", "value", "stderr", ("n", "examples")])


def summary_rows(per_model: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model: {"model": name, "<task>/<metric>": value, ...} (no stderr columns)."""
    out = []
    for name, results in per_model.items():
        row: dict[str, Any] = {"model": name}
        for r in results:
            for k, v in r["metrics"].items():
                if not k.endswith("_stderr") and k != "windows":
                    row[f"{r['task']}/{k}"] = v
        out.append(row)
    return out


def _resources(device: str, num_cpus: float) -> dict[str, Any]:
    """Ray resources of one evaluation task for ``device`` (auto: a GPU when the cluster has one)."""
    import ray

    opts: dict[str, Any] = {"num_cpus": num_cpus}
    cluster = ray.cluster_resources()
    if device == "cuda" or (device == "auto" and cluster.get("GPU", 0) > 0):
        opts["num_gpus"] = 1
    elif device == "npu" or (device == "auto" and cluster.get("NPU", 0) > 0):
        opts["resources"] = {"NPU": 1}
    return opts


def evaluate_many(model_dirs: dict[str, str | os.PathLike], tasks: str | list[str], out_dir: str | os.PathLike,
                  data_dir: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 16,
                  shots: int = 0, max_new_tokens: int = 128, device: str = "auto", num_cpus: float = 1,
                  overwrite: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every model of ``model_dirs`` ({name: directory}) on ``tasks`` with Ray tasks.

    Returns all result rows (each with "model" = the model's name); writes the per-model
    and summary tables into ``out_dir``. Connects to Ray (``ray.init()``) when not connected."""
    from cbd_ray.evaluate import prepare_tasks, task_spec
    from cbd_ray.tasks import parse_tasks

    _check_inputs(model_dirs, device)
    parsed = parse_tasks(tasks)
    specs = [task_spec(t, p) for t, p in parsed]
    out = Path(out_dir)
    settings = {"tasks": specs, "limit": limit, "shots": shots, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None}
    per_model, todo = _finished(model_dirs, out, settings, overwrite)

    def log(msg: str) -> None:
        if progress:
            print(f"[evaluate_many] {msg}", file=sys.stderr, flush=True)

    if per_model:
        log(f"reusing finished results of {', '.join(per_model)}")
    if todo:
        prepared = prepare_tasks(parsed, data_dir, limit, shots)  # bad data fails before any worker starts
        per_model.update(_run_on_ray(todo, specs, prepared, settings, out, device, num_cpus, progress, log))
    ordered = {name: per_model[name] for name in model_dirs}
    rows = summary_rows(ordered)
    atomic_write_json(out / "summary.json", rows)
    atomic_write_text(out / "summary.md", markdown_table(rows))
    _plot_summary(rows, out / "summary.png")
    return [dict(r, model=name) for name, results in ordered.items() for r in results]


def _check_inputs(model_dirs: dict[str, str | os.PathLike], device: str) -> None:
    """Refuse before any work: no models, an unknown device, an unsafe name, a bad model directory."""
    from cbd_ray.devices import KINDS
    from cbd_ray.evaluate import check_model_dir

    if not model_dirs:
        raise CBDError("no model to evaluate")
    if device not in KINDS:
        raise CBDError(f"device {device!r} is not one of {', '.join(KINDS)}")
    for name, d in model_dirs.items():
        if not NAME_RE.match(name):
            raise CBDError(f"model name {name!r} is not a safe file name (letters, digits, . _ -)")
        check_model_dir(d)


def _finished(model_dirs: dict[str, str | os.PathLike], out: Path, settings: dict[str, Any],
              overwrite: bool) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """(results already in ``out`` for these settings, {name: dir} still to evaluate). A
    result of other settings or another model directory is an error unless ``overwrite``."""
    same = {k: settings[k] for k in ("tasks", "limit", "shots", "max_new_tokens", "data_dir")}
    per_model: dict[str, list[dict[str, Any]]] = {}
    todo: dict[str, str] = {}
    for name, d in model_dirs.items():
        f = out / f"{name}.json"
        if f.exists() and not overwrite:
            old = json.loads(f.read_text())
            if {k: old.get("settings", {}).get(k) for k in same} == same and old.get("dir") == str(d):
                per_model[name] = old["results"]
                continue
            raise FileExistsError(f"{f} holds results of other settings or another model; "
                                  f"pass overwrite=True (--overwrite) to replace it")
        todo[name] = str(d)
    return per_model, todo


def _run_on_ray(todo: dict[str, str], specs: list[str], prepared: dict[str, Any], settings: dict[str, Any],
                out: Path, device: str, num_cpus: float, progress: bool,
                log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """One Ray task per model of ``todo``; each model's tables are written as it finishes.
    An error cancels the models still running."""
    import ray
    from tqdm.auto import tqdm

    connect_ray()
    data_ref = ray.put(prepared)
    remote = ray.remote(_evaluate_one).options(**_resources(device, num_cpus), max_retries=0)
    pending = {remote.remote(name, d, specs, data_ref, settings, device): name for name, d in todo.items()}
    log(f"{len(todo)} model(s) x {len(specs)} task(s) on Ray")
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="models", disable=not progress, file=sys.stderr)
    per_model: dict[str, list[dict[str, Any]]] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            results = ray.get(done[0])
            per_model[name] = results
            _write_tables(out, name, todo[name], settings, results)
            bar.update(1)
            head = ", ".join(f"{r['task']}:{next(iter(r['metrics'].values())):.4g}" for r in results)
            log(f"{name} done after {time.perf_counter() - t0:.1f}s: {head}")
    except BaseException:
        for ref in pending:  # do not leave other models running for nothing
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return per_model


def _plot_summary(rows: list[dict[str, Any]], out_png: Path) -> Path | None:
    """Grouped bars of every 0..1 score (accuracies, Rouge-L) per model; perplexities are
    left to the table (another scale)."""
    from cbd_ray.report import plot_bar

    keys = [k for k in rows[0] if k != "model" and k.rsplit("/", 1)[-1].startswith(("acc", "rouge"))] if rows else []
    if not keys:
        return None
    values = {k: {r["model"]: float(r[k]) for r in rows if r.get(k) is not None} for k in keys}
    return plot_bar(values, out_png, ylabel="score", title="evaluation by task")


def _write_tables(out: Path, name: str, model_dir: str, settings: dict[str, Any],
                 results: list[dict[str, Any]]) -> None:
    atomic_write_json(out / f"{name}.json", {"model": name, "dir": model_dir, "settings": settings,
                                             "results": results})
    atomic_write_text(out / f"{name}.md", f"# {name}\n\n`{model_dir}`\n\n" + model_table(results))


def run(ctx: Any) -> dict[str, Any]:
    """Pipeline form: ``ctx.config`` holds ``models`` ({name: dir}, relative to the run
    directory or absolute) and the keyword arguments of ``evaluate_many``; tables go to
    ``ctx.out``. Returns {"<model>/<task>/<metric>": value}."""
    cfg = dict(ctx.config)
    if "cpus_per_task" in cfg:  # the name used by the chain config's evaluation section
        cfg["num_cpus"] = cfg.pop("cpus_per_task")
    models = {n: (Path(d) if Path(d).is_absolute() else Path(ctx.run_dir) / d) for n, d in cfg.pop("models").items()}
    rows = evaluate_many(models, cfg.pop("tasks"), ctx.out, **cfg)
    return {f"{r['model']}/{r['task']}/{k}": v for r in rows for k, v in r["metrics"].items()
            if not k.endswith("_stderr")}
