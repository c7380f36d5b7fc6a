"""Stages over a manifest: run what is missing, skip what is intact, resume what was cut.

A :class:`Stage` is a plain function ``fn(ctx) -> metrics`` plus what the pipeline needs to
decide whether to run it: its own config slice, the stages whose outputs it reads, and the
directory it writes. :func:`run_stages` walks the stages in order and, for each one,

* **skips** it when the manifest says ``done``, its config hash (the slice plus the digests
  of its inputs' outputs) is unchanged and every output file still has its checksum;
* **resumes** it when it was ``running`` or ``failed`` under the same config hash: its work
  directory (``work/<stage>``, where Ray Train keeps checkpoints) is kept, so training
  continues from the last checkpoint;
* **redoes** it when its config or an input changed (the work directory is cleared first)
  or when an output file no longer matches its checksum.

Outputs are written into a hidden sibling directory and renamed into place when the stage
succeeds, so a killed stage never leaves outputs that look whole. A failing stage is
recorded as ``failed`` with the error; earlier outputs stay untouched.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cbd_ray.config import config_hash
from cbd_ray.errors import CBDError
from cbd_ray.manifest import Manifest, now
from cbd_ray.storage import dir_checksums, verify_checksums


logger = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage raised; the manifest records it as failed."""

    def __init__(self, stage: str, error: str) -> None:
        super().__init__(f"stage {stage!r} failed: {error}")
        self.stage = stage
        self.error = error


class RunDirConflict(CBDError):
    """The run directory belongs to another config."""


@dataclass
class StageContext:
    """What a stage function gets.

    ``out``: the directory to write (does not exist yet; create it). ``work``: a directory
    kept across attempts for checkpoints. ``inputs``: output directory of each input stage.
    ``resume``: True when a previous attempt of the same config was cut short."""

    name: str
    run_dir: Path
    out: Path
    work: Path
    inputs: dict[str, Path]
    config: dict[str, Any]
    resume: bool = False
    log: Callable[[str], None] = print
    run_uri: str | None = None  # the run directory in storage (None: ``run_dir`` itself)
    input_checksums: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        """True when the run lives in object storage: workers must not get local paths."""
        from cbd_ray.storage import is_remote

        return self.run_uri is not None and is_remote(self.run_uri)

    def uri(self, *parts: str) -> str:
        """A location in the run directory, as workers reach it."""
        from cbd_ray.storage import uri_join

        return uri_join(self.run_uri or str(self.run_dir), *parts)

    def ref(self, name: str, sub: str | None = None, file: str | None = None) -> dict[str, Any]:
        """A storage reference to input ``name``'s outputs (or its subdirectory ``sub``, or
        one ``file`` in it), with their recorded checksums, for a worker to fetch."""
        from cbd_ray.storage import make_ref

        local = self.inputs[name]
        rel = local.relative_to(self.run_dir).as_posix()
        sums = self.input_checksums.get(name, {})
        if sub:
            rel, local = f"{rel}/{sub}", local / sub
            sums = {k[len(sub) + 1:]: v for k, v in sums.items() if k.startswith(sub.rstrip("/") + "/")}
        if file:
            sums = {k: v for k, v in sums.items() if k == file}
        return make_ref(self.uri(rel), sums, file=file, local=str(local / file if file else local))

    def publish(self, local_dir: Path, tag: str) -> dict[str, Any]:
        """A reference to a directory the driver made for this stage (e.g. a student's
        starting weights in ``work``): uploaded to ``work/<stage>/<tag>`` in remote storage."""
        from cbd_ray.storage import delete_dir, dir_checksums, make_ref, upload_dir

        sums = dir_checksums(local_dir)
        if not self.remote:
            return make_ref(str(Path(local_dir).resolve()), sums, local=str(local_dir))
        dest = self.uri("work", self.name, tag)
        delete_dir(dest)
        upload_dir(local_dir, dest)
        return make_ref(dest, sums, local=str(local_dir))


@dataclass
class Stage:
    """One step of the pipeline. ``output`` is the run-relative directory it writes."""

    name: str
    fn: Callable[[StageContext], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    inputs: Sequence[str] = ()
    output: str | None = None
    teacher: str | None = None  # the model whose forward passes count as teacher tokens

    @property
    def out_rel(self) -> str:
        return self.output or f"stages/{self.name}"


@dataclass
class Decision:
    action: str  # "skip" | "run" | "resume" | "redo"
    reason: str


#: (metric, label): a finished stage's console line shows the first of these its metrics hold
KEY_METRICS = (("selected_eval_loss", "eval loss"), ("eval_loss", "eval loss"), ("final_loss", "loss"),
               ("heldout_nll", "held-out NLL"), ("targets_better_than_random", "targets better than random"),
               ("targets", "targets"), ("rows", "rows"), ("train_records", "train records"))


def summary_line(stage: str, wall: float, metrics: dict[str, Any], out_rel: str) -> str:
    """The one line a finished stage leaves on the console: its wall time, its key metric
    (:data:`KEY_METRICS`) and where its output went, relative to the run directory."""
    key = next(((k, label) for k, label in KEY_METRICS
                if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)), None)
    shown = f", {key[1]} {metrics[key[0]]:.4g}" if key else ""
    return f"[{stage}] done in {wall:.1f}s{shown} -> {out_rel}"


#: files of a stage's output that describe the run (timings, metrics, cards) rather than
#: being its result: left out of the digest, so an identical rebuild does not cascade
_NOT_DIGESTED = ("stage.json", "distill.json", "README.md", "targets.json", "cbd.json")


def output_digest(checksums: dict[str, str]) -> str:
    """One hash over the output files that later stages consume (models, data, config)."""
    return config_hash({k: v for k, v in checksums.items()
                        if Path(k).name not in _NOT_DIGESTED and not Path(k).name.startswith("grid")})


def _digest_of(rec: dict[str, Any] | None) -> str | None:
    return None if rec is None else (rec.get("outputs") or {}).get("digest")


def stage_hash(stage: Stage, manifest: Manifest) -> tuple[str, dict[str, str | None]]:
    """The stage's config hash: its config slice plus the digest of each input's outputs."""
    inputs = {n: _digest_of(manifest.get(n)) for n in stage.inputs}
    return config_hash({"config": stage.config, "inputs": inputs}), inputs


def decide(stage: Stage, manifest: Manifest, run_dir: Path, forced: bool) -> Decision:
    """Whether to skip, run, resume or redo ``stage`` (see the module docstring)."""
    rec = manifest.get(stage.name)
    h, _ = stage_hash(stage, manifest)
    if forced:
        return Decision("redo", "forced")
    if rec is None or rec.get("status") == "pending":
        return Decision("run", "new")
    if rec.get("config_hash") != h:
        return Decision("redo", "its config or an input changed")
    if rec.get("status") in ("running", "failed"):
        return Decision("resume", f"the last attempt was cut short ({rec.get('status')})")
    outputs = rec.get("outputs") or {}
    bad = verify_checksums(run_dir / outputs.get("path", stage.out_rel), outputs.get("checksums", {}))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return Decision("redo", f"output files changed or missing: {shown}")
    return Decision("skip", "done and intact")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing an old ``final`` (renames, never copies)."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def run_stages(
    stages: Sequence[Stage],
    run_dir: str | os.PathLike,
    manifest: Manifest | None = None,
    from_stage: str | None = None,
    force: bool = False,
    after_stage: Callable[[str, dict[str, Any]], None] | None = None,
    on_saved: Callable[[str], None] | None = None,
    run_uri: str | None = None,
    log: Callable[[str], None] = lambda s: logger.info("%s", s),
) -> Manifest:
    """Run ``stages`` in order over the manifest of ``run_dir``.

    ``from_stage``: redo this stage and every later one (earlier ones are skipped when intact).
    ``force``: redo every stage (from ``from_stage`` when given). ``after_stage(name, record)``
    is called after each stage that ran or was skipped (a test hook: raising there simulates
    a job killed after that stage). ``on_saved`` is called with the stage's name after its record
    is final (done or failed), e.g. to copy its outputs and the manifest to remote storage.
    ``run_uri``: the run directory as workers reach it (object storage), when ``run_dir`` is
    the driver's local copy. A failing stage raises
    :class:`StageFailed` after its record is saved.
    """
    run_dir = Path(run_dir)
    manifest = manifest or Manifest.load(run_dir)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise CBDError(f"stage names repeat: {names}")
    if from_stage is not None and from_stage not in names:
        raise CBDError(f"--from-stage {from_stage!r} is not a stage of this run; stages: {', '.join(names)}")
    start = names.index(from_stage) if from_stage is not None else (0 if force else len(names))
    for k, stage in enumerate(stages):
        forced = k >= start
        d = decide(stage, manifest, run_dir, forced)
        if d.action == "skip":
            log(f"[{stage.name}] skip: {d.reason}")
            if after_stage:
                after_stage(stage.name, manifest.get(stage.name) or {})
            continue
        try:
            _run_one(stage, manifest, run_dir, d, log, run_uri)
        finally:
            if on_saved:  # the stage's record (done or failed) reaches storage either way
                on_saved(stage.name)
        if after_stage:
            after_stage(stage.name, manifest.get(stage.name) or {})
    return manifest


def _run_one(stage: Stage, manifest: Manifest, run_dir: Path, d: Decision, log: Callable[[str], None],
             run_uri: str | None = None) -> None:
    h, inputs = stage_hash(stage, manifest)
    missing = [n for n, dig in inputs.items() if dig is None]
    if missing:
        raise CBDError(f"stage {stage.name!r} needs the outputs of {', '.join(missing)}, which are not done")
    work = run_dir / "work" / stage.name
    # Only a cut-short attempt of the same config resumes from its checkpoints. A changed
    # config, --force, or outputs that no longer match their checksums start afresh: a
    # checkpoint of a run whose output was damaged is not trusted either.
    keep_work = d.action == "resume"
    if not keep_work and work.exists():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    final = run_dir / stage.out_rel
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    prev = manifest.get(stage.name) or {}
    attempts = int(prev.get("attempts", 0)) + 1
    log(f"[{stage.name}] {d.action}: {d.reason}")
    manifest.update(
        stage.name, status="running", config_hash=h, config=stage.config, inputs=inputs,
        started=now(), finished=None, error=None, attempts=attempts, teacher=stage.teacher,
        outputs={"path": stage.out_rel},
    )
    ctx = StageContext(
        name=stage.name, run_dir=run_dir, out=tmp, work=work,
        inputs={n: run_dir / (manifest.get(n) or {}).get("outputs", {}).get("path", f"stages/{n}") for n in stage.inputs},
        config=stage.config, resume=keep_work, log=log, run_uri=run_uri,
        input_checksums={n: dict((manifest.get(n) or {}).get("outputs", {}).get("checksums", {})) for n in stage.inputs},
    )
    t0 = time.perf_counter()
    try:
        metrics = stage.fn(ctx) or {}
        if not tmp.exists():
            tmp.mkdir(parents=True)
        from cbd_ray.storage import atomic_write_json

        atomic_write_json(tmp / "stage.json", {"stage": stage.name, "config_hash": h, "metrics": metrics})
        _replace_dir(tmp, final)
    except BaseException as exc:
        wall = time.perf_counter() - t0
        err = f"{type(exc).__name__}: {exc}"
        tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        manifest.update(stage.name, status="failed", error=err, traceback=tail, finished=now(), wall_s=round(wall, 3))
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"[{stage.name}] FAILED after {wall:.1f}s: {err}")
        if isinstance(exc, Exception):
            raise StageFailed(stage.name, err) from exc
        raise
    wall = time.perf_counter() - t0
    checksums = dir_checksums(final)
    manifest.update(
        stage.name, status="done", finished=now(), wall_s=round(wall, 3), metrics=metrics,
        student_tokens=int(metrics.get("student_tokens", 0) or 0),
        teacher_tokens=int(metrics.get("teacher_tokens", 0) or 0),
        outputs={"path": stage.out_rel, "checksums": checksums, "digest": output_digest(checksums)},
        traceback=None,
    )
    log(summary_line(stage.name, wall, metrics, stage.out_rel))
