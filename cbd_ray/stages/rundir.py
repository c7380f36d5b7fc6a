"""A chain's run directory: where it is, whose it is, and its copy in object storage.

The run directory (``<storage>/<run.name>``) is the source of truth of a run. With object
storage (``s3://...``) the URI is the run directory and the driver keeps a private working
copy, fetched at every start (:func:`fetch_run`) and uploaded stage by stage
(:func:`uploader`). A directory made by another config (:func:`identity`) or not by cbd-ray
at all (:func:`refuse_foreign`) is never written over.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from cbd_ray.config import config_hash
from cbd_ray.lease import LEASE_FILE
from cbd_ray.manifest import MANIFEST, Manifest
from cbd_ray.pipeline import RunDirConflict
from cbd_ray.schema import ChainConfig
from cbd_ray.storage import (delete_dir, is_remote, list_files, local_path, redact, sync_down, upload_dir, upload_file,
                             uri_join)

Log = Callable[[str], None]


def identity(cfg: ChainConfig) -> dict[str, Any]:
    """What makes a run directory belong to a config: its name and the chain's structure
    (source, bridge teacher, anchors). Other settings may change between reruns; the stages
    they touch are redone."""
    structure = {
        "source": cfg.source.model_dump(mode="json", exclude={"sft"}),
        "teacher": cfg.bridge.teacher.model_dump(mode="json", exclude={"sft"}) if cfg.bridge else None,
        "anchors": [{"name": a.name, "model": a.model, "shape": a.shape.model_dump() if a.shape else None}
                    for a in cfg.anchors],
    }
    return {"name": cfg.run.name, "structure": config_hash(structure)}


def resolve_run_dir(cfg: ChainConfig, storage: str | None = None) -> tuple[str, Path, bool]:
    """(run URI, the driver's run directory, remote?). With object storage (s3://...) the URI
    is the run directory, the source of truth; the driver keeps a private working copy of
    its small files and the models it needs to check (``$CBD_LOCAL_RUNS`` or
    ~/.cache/cbd_ray/runs, keyed by the URI), refreshed from the URI at every start."""
    root = storage or cfg.run.storage
    if is_remote(root):
        uri = uri_join(root, cfg.run.name)
        local_root = Path(os.environ.get("CBD_LOCAL_RUNS", Path.home() / ".cache" / "cbd_ray" / "runs"))
        key = hashlib.sha256(uri.encode()).hexdigest()[:12]
        return uri, local_root / f"{cfg.run.name}-{key}", True
    run_dir = local_path(root).expanduser().resolve() / cfg.run.name
    return str(run_dir), run_dir, False


def refuse_foreign(uri: str, run_dir: Path, remote: bool) -> None:
    """Refuse a run directory that exists, holds something, and was not made by this project
    (no manifest.json): its stages would replace the user's same-named folders."""
    if remote:  # the lease (this driver's, taken first) does not make a directory a run
        files = [f for f in list_files(uri) if f != LEASE_FILE]
        foreign = bool(files) and MANIFEST not in files
    else:
        foreign = (run_dir.is_dir() and any(e.name != LEASE_FILE for e in run_dir.iterdir())
                   and not (run_dir / MANIFEST).is_file())
    if foreign:
        raise RunDirConflict(f"run directory {redact(uri)} exists and is not a cbd-ray run (no {MANIFEST}); "
                             "choose another run.name or --storage")


def fetch_run(uri: str, run_dir: Path, log: Log) -> None:
    """Refresh the driver's copy of a remote run from the URI: only "not found" means a new
    run; any other storage error stops the job (never start afresh over a run we could not read)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the driver's private copy: the URI is the truth
    run_dir.mkdir(parents=True)
    # checkpoints stay in storage for Ray Train, token corpora for the workers that stream them
    n = sync_down(uri, run_dir, exclude=("work", "corpora", LEASE_FILE))
    log(f"storage: {n} file(s) of {redact(uri)} fetched" if n else f"storage: {redact(uri)} is a new run")


def uploader(uri: str, run_dir: Path, manifest: Manifest,
             check: Callable[[], None] = lambda: None) -> Callable[[str], None]:
    """After each stage: its output directory replaces the one in storage, then the
    top-level files (manifest last, so storage never records outputs it does not hold).
    ``check`` runs first (the lease's: never write over a driver that took the run over)."""
    def upload(stage: str) -> None:
        check()
        rec = manifest.get(stage) or {}
        rel = (rec.get("outputs") or {}).get("path")
        if rec.get("status") == "done" and rel and (run_dir / rel).is_dir():
            delete_dir(uri_join(uri, rel))
            upload_dir(run_dir / rel, uri_join(uri, rel))
        top = [f for f in sorted(run_dir.iterdir()) if f.is_file() and f.name not in (MANIFEST, LEASE_FILE)]
        for f in [*top, run_dir / MANIFEST]:
            upload_file(f, uri_join(uri, f.name))

    return upload
