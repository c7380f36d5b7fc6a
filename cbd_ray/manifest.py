"""The run directory's manifest: what each stage did, so a rerun knows what to skip.

``manifest.json`` in the run directory holds the run's identity (the config name and the
hash of the chain's structure) and one record per stage::

    status         pending | running | done | failed
    config_hash    sha256 of the stage's own config slice and its inputs' digests
    config         that slice
    inputs         {stage name: digest of its outputs}
    outputs        {"path": relative dir, "checksums": {file: sha256}, "digest": sha256}
    metrics        whatever the stage returned
    started, finished (ISO UTC), wall_s, student_tokens, teacher_tokens, teacher
    error          "Type: message" and the traceback's tail when the stage failed
    attempts       how many times the stage was started

Every write is atomic (storage.atomic_write_json), so a killed job leaves the last complete
manifest.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from cbd_ray.errors import CBDError
from cbd_ray.storage import atomic_write_json

MANIFEST = "manifest.json"
STATUSES = ("pending", "running", "done", "failed")


def now() -> str:
    """The current UTC time, ISO 8601 with microseconds (sortable as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class Manifest:
    """The manifest of one run directory, saved after every change."""

    def __init__(self, run_dir: str | os.PathLike, data: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = data if data is not None else {"version": 1, "stages": {}}
        self.data.setdefault("stages", {})

    # ------------------------------------------------------------------ files
    @property
    def path(self) -> Path:
        return self.run_dir / MANIFEST

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "Manifest":
        """The manifest of ``run_dir`` (an empty one when there is none yet)."""
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            return cls(run_dir)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CBDError(f"{path} is not valid JSON ({exc}); move it away to start the run afresh") from None
        if not isinstance(data, dict):
            raise CBDError(f"{path} holds a JSON {type(data).__name__}, not an object: not a cbd-ray manifest; "
                           "move it away to start the run afresh")
        if not isinstance(data.get("stages", {}), dict):
            raise CBDError(f"{path}: 'stages' is a {type(data['stages']).__name__}, not an object: "
                           "not a cbd-ray manifest; move it away to start the run afresh")
        return cls(run_dir, data)

    def save(self) -> None:
        self.data["updated"] = now()
        atomic_write_json(self.path, self.data)

    # ------------------------------------------------------------------ records
    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def get(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        rec = self.stages.setdefault(name, {"status": "pending"})
        rec.update(fields)
        self.save()
        return rec

    def failed(self) -> list[str]:
        return [n for n, r in self.stages.items() if r.get("status") == "failed"]

    def identity(self) -> dict[str, Any] | None:
        return self.data.get("identity")

    def set_identity(self, identity: dict[str, Any]) -> None:
        self.data["identity"] = identity
        self.save()
