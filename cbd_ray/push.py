"""Upload the models of a run (or one model directory) to the Hugging Face Hub.

Each model goes to its own repo: ``ORG/NAME`` for a single model, ``ORG/NAME-<model>`` when
several are pushed. What is uploaded is a staging copy (large files hard-linked when the
file system allows): the card is rewritten with the run's evaluation of that model, and the
provenance files lose the machine paths they record (``cbd.json`` anchors' ``path``,
``distill.json``'s teacher/student/data become names). The run directory is not changed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cbd_ray.cards import distilled_card, identity, target_card
from cbd_ray.errors import CBDError

log = logging.getLogger(__name__)
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def run_models(run_dir: str | os.PathLike) -> dict[str, Path]:
    """{name: model directory} of a run directory (targets, then anchors and source), or of
    a single model directory (its own name)."""
    d = Path(run_dir)
    if (d / "config.json").is_file():
        return {d.resolve().name: d}
    found: dict[str, Path] = {}
    targets = d / "targets" / "targets.json"
    if targets.is_file():
        for r in json.loads(targets.read_text()):
            found[r["name"]] = d / "targets" / r["path"]
    models = d / "models"
    for m in sorted(models.iterdir()) if models.is_dir() else []:
        if (m / "config.json").is_file() and list(m.glob("*.safetensors")):
            found.setdefault(m.name, m)
    if not found:
        raise CBDError(f"{d} holds no model: expected a model directory (config.json) or a run directory "
                       "(targets/targets.json, models/*)")
    return found


def _evaluation(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """The run's evaluation rows of model ``name`` (held-out loss, tasks)."""
    path = run_dir / "evaluation" / "evaluation.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    keep = ("heldout_nll", "random_nll", "heldout_ppl")
    out = []
    for r in rows:
        if r.get("model") == name:
            out.append({"task": "held-out text", "metrics": {k: r[k] for k in keep if k in r}})
            out += [t for t in r.get("tasks", []) if isinstance(t, dict)]
    return out


def _scrub(stage: Path) -> None:
    """Machine paths out of the provenance files of a staged model."""
    made = stage / "cbd.json"
    if made.is_file():
        meta = json.loads(made.read_text())
        for a in meta.get("anchors", {}).values():
            a.pop("path", None)
        made.unlink()  # a hard link to the run's file: replace, never write through it
        made.write_text(json.dumps(meta, indent=2) + "\n")
    dj = stage / "distill.json"
    if dj.is_file():
        info = json.loads(dj.read_text())
        for k in ("teacher", "student", "data"):
            if isinstance(info.get(k), str):
                info[k] = Path(info[k]).name
        info.get("metrics", {}).pop("out", None)
        dj.unlink()
        dj.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def stage_model(model_dir: Path, name: str, run_dir: Path, into: Path) -> Path:
    """A copy of ``model_dir`` ready to upload, with its card and provenance rewritten."""
    stage = into / name
    stage.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("."):
            try:
                os.link(f, stage / f.name)
            except OSError:
                shutil.copy2(f, stage / f.name)
    evaluation = _evaluation(run_dir, name)
    made = model_dir / "cbd.json"
    if made.is_file():
        card = target_card({**json.loads(made.read_text()), "name": name}, evaluation)
    else:
        info = json.loads((model_dir / "distill.json").read_text()) if (model_dir / "distill.json").is_file() else {}
        me = identity(model_dir)
        card = distilled_card(name, None, me, info.get("config", {}), info.get("metrics", {})) if info else None
    _scrub(stage)
    if card is not None:
        (stage / "README.md").unlink(missing_ok=True)
        card.save(stage / "README.md")
    return stage


def push_run(run_dir: str | os.PathLike, repo: str, targets: Sequence[str] | None = None,
             private: bool = False, api: Any = None) -> list[dict[str, Any]]:
    """Upload the chosen models of ``run_dir``; returns one record per model (repo, files, url)."""
    if not _REPO.match(repo):
        raise CBDError(f"--repo {repo!r}: expected ORG/NAME (letters, digits, '.', '_', '-')")
    d = Path(run_dir)
    models = run_models(d)
    chosen = list(targets) if targets else list(models)
    unknown = [t for t in chosen if t not in models]
    if unknown:
        raise CBDError(f"--targets {', '.join(unknown)}: not in {d}; it has: {', '.join(models)}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    done = []
    with tempfile.TemporaryDirectory(prefix=".cbd_push_") as tmp:
        for name in chosen:
            repo_id = repo if len(chosen) == 1 else f"{repo}-{name}"
            stage = stage_model(models[name], name, d, Path(tmp))
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(stage), repo_id=repo_id, repo_type="model",
                                     commit_message=f"cbd-ray: {name}")
            files = sorted(p.name for p in stage.iterdir())
            log.info("pushed %s -> %s (%d files)", name, repo_id, len(files))
            done.append({"model": name, "repo": repo_id, "files": files, "url": str(getattr(info, "commit_url", info))})
    return done
