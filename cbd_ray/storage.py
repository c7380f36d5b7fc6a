"""Artifact storage: atomic writes, checksums, and local-or-remote roots.

A run directory is the source of truth of a run. Everything is written atomically: a file
goes to a temporary name, is fsynced, then renamed; a model directory is written into a
hidden sibling directory and renamed into place only when complete, so a crash never
leaves a half-written model that looks whole.

Roots may be local paths or any URI ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``hdfs://``).
Training and interpolation work in local directories; ``sync_up``/``sync_down`` copy whole
directories to and from a remote root.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

_CHUNK = 1 << 20


def is_remote(uri: str | os.PathLike) -> bool:
    """True for URIs with a scheme other than file:// (s3://, gs://, hdfs://, ...)."""
    s = str(uri)
    return "://" in s and not s.startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    s = str(uri)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it replaces ``final``.

    On an exception the temporary directory is removed and ``final`` is untouched. With
    ``overwrite=False`` an existing ``final`` is an error (checked before and after the work).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while writing; not overwriting it")
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dir_checksums(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names, sorted; hidden files skipped)."""
    root = Path(path)
    out: dict[str, str] = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = file_sha256(f)
    return out


def dir_digest(path: str | os.PathLike) -> str:
    """One sha256 over a directory's file names and contents."""
    h = hashlib.sha256()
    for name, digest in dir_checksums(path).items():
        h.update(name.encode())
        h.update(digest.encode())
    return h.hexdigest()


def verify_checksums(path: str | os.PathLike, expected: dict[str, str]) -> list[str]:
    """Names whose file is missing or whose sha256 differs from ``expected`` (empty if intact)."""
    root = Path(path)
    bad = []
    for name, digest in expected.items():
        f = root / name
        if not f.is_file() or file_sha256(f) != digest:
            bad.append(name)
    return bad


def check_writable(uri: str | os.PathLike) -> None:
    """Raise a clear error when a storage root cannot be written (before any work)."""
    if is_remote(uri):
        import pyarrow.fs as pafs

        try:
            fs, base = pafs.FileSystem.from_uri(str(uri))
            fs.create_dir(base, recursive=True)
        except Exception as exc:  # noqa: BLE001 - any backend error is the same to the user
            raise PermissionError(f"storage root {uri} cannot be written: {exc}") from exc
        return
    root = local_path(uri)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"storage root {root} cannot be written: {exc}") from exc


def sync_up(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local directory to a (remote) URI with pyarrow.fs."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        dst = local_path(uri)
        if Path(local_dir).resolve() != dst.resolve():
            shutil.copytree(local_dir, dst, dirs_exist_ok=True)
        return
    fs, base = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local_dir), base, destination_filesystem=fs)


def sync_down(uri: str, local_dir: str | os.PathLike) -> None:
    """Copy a (remote) URI's directory into a local directory with pyarrow.fs."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        src = local_path(uri)
        if src.resolve() != Path(local_dir).resolve():
            shutil.copytree(src, local_dir, dirs_exist_ok=True)
        return
    fs, base = pafs.FileSystem.from_uri(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(base, str(local_dir), source_filesystem=fs)
