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
import io
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cbd_ray.errors import CBDError

_CHUNK = 1 << 20

#: files that mark a directory as written by cbd-ray (an interpolated model's provenance, a
#: distilled model's record, a run's manifest)
MARKERS = ("cbd.json", "distill.json", "manifest.json")

#: what a model directory written by cbd-ray may hold: with overwrite only these are replaced
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
               "chat_template.jinja", "chat_template.json", "cbd.json", "distill.json", "metrics.json", "README.md",
               "baseline.json", "lineage.json")  # baseline.json: cbd_ray.baselines; lineage.json: cbd_ray.align


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def public_mode(directory: bool = False) -> int:
    """0644 for files, 0755 for directories, less what the umask takes away (mkstemp makes
    0600 files; outputs are meant to be shared like any file the user writes)."""
    return (0o777 if directory else 0o666) & ~_umask()


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
        os.fchmod(fd, public_mode())
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
        readable = public_mode() & 0o444
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                # files copied from a 0600 source (or made by mkstemp) become readable as the
                # umask allows, like every other output
                if f.stat().st_mode & readable != readable:
                    os.chmod(f, f.stat().st_mode | readable)
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


def _overlap(out: Path, inputs: Iterable[Any] | dict[str, Any], what: str) -> None:
    """Refuse an output equal to, containing, or inside any local input path (``inputs``: paths,
    or {label: path} so the message can say "the small anchor")."""
    o = out.resolve()
    named = inputs.items() if isinstance(inputs, dict) else (("input", i) for i in inputs)
    for label, inp in named:
        if inp is None or is_remote(inp):
            continue
        i = local_path(inp).resolve()
        if o == i:
            raise CBDError(f"{what} {out} is the {label} itself; choose another directory")
        if o in i.parents:
            raise CBDError(f"{what} {out} contains the {label} {inp}; choose a directory outside every input")
        if i in o.parents:
            raise CBDError(f"{what} {out} lies inside the {label} {inp}; choose a directory outside every input")


def _foreign(out: Path, own: Iterable[str]) -> list[str]:
    """Entries of ``out`` that no pattern of ``own`` matches (hidden work files excepted)."""
    import fnmatch

    pats = list(own)
    return sorted(e.name for e in out.iterdir()
                  if not e.name.startswith(".") and not (e.is_file() and any(fnmatch.fnmatch(e.name, p) for p in pats)))


def guard_output(out: str | os.PathLike, inputs: Iterable[Any] | dict[str, Any] = (), overwrite: bool = False,
                 marker: Iterable[str] = ("cbd.json",), own: Iterable[str] | None = None,
                 reuse: bool = False, what: str = "--out") -> str:
    """The one rule for output directories, checked before any work. Returns the state of
    ``out``: "absent", "empty" or "ours" (it carries one of the ``marker`` files).

    Refused with one line naming ``out``: an output equal to, containing or inside any of
    ``inputs``, or a file (CBDError); a non-empty directory without a marker, even with
    overwrite, since only what cbd-ray wrote may be replaced; a marked directory holding
    entries that ``own`` (glob patterns, None: anything) does not match; a marked directory
    without ``overwrite``, unless ``reuse`` (the caller then compares what is there with what
    it would write, see :func:`verify_checksums`) (FileExistsError).
    """
    if is_remote(out):
        return "absent"  # remote roots are written by sync_up into fresh run-keyed prefixes
    out = local_path(out)
    _overlap(out, inputs, what)
    if not out.exists() and not out.is_symlink():
        return "absent"
    if not out.is_dir():
        raise CBDError(f"{what} {out} is a file, not a directory; choose a directory path")
    if not any(out.iterdir()):
        return "empty"
    marker = tuple(marker)
    if not any((out / m).is_file() for m in marker):
        raise FileExistsError(f"{what} {out} is a non-empty directory that cbd-ray did not write (no {' or '.join(marker)}); "
                       "it is never replaced: choose a new or empty directory")
    extra = _foreign(out, own) if own is not None else []
    if extra:
        raise FileExistsError(f"{what} {out} holds {', '.join(extra[:5])} which cbd-ray did not write; "
                       "move it away or choose another directory")
    if not overwrite and not reuse:
        raise FileExistsError(f"{what} {out} already exists (made by cbd-ray); pass --overwrite to replace it")
    return "ours"


def guard_output_file(out: str | os.PathLike, inputs: Iterable[Any] = (), overwrite: bool = False,
                      ours: Callable[[Path], bool] | None = None, what: str = "--out") -> None:
    """The output rule for a single file: not inside (or equal to) an input, not a directory,
    its folder creatable, and an existing file replaced only with ``overwrite`` and only when
    ``ours(path)`` says cbd-ray wrote it."""
    out = local_path(out)
    _overlap(out, inputs, what)
    if out.is_dir():
        raise CBDError(f"{what} {out} is a directory; give a file path")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CBDError(f"{what} {out} cannot be created: {parent} is a file")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{what} {out} already exists; pass --overwrite to replace it")
        if ours is not None and not ours(out):
            raise CBDError(f"{what} {out} is a file that cbd-ray did not write; it is never replaced")


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


def sync_up(local_dir: str | os.PathLike, uri: str, exclude: tuple[str, ...] = ()) -> None:
    """Copy a local directory to a URI (or another local directory) with pyarrow.fs."""
    if not is_remote(uri) and Path(local_dir).resolve() == local_path(uri).resolve():
        return
    upload_dir(local_dir, uri, exclude)


def sync_down(uri: str, local_dir: str | os.PathLike, exclude: tuple[str, ...] = ()) -> int:
    """Copy a URI's directory into a local directory; 0 files when it does not exist yet.
    Any other storage error raises :class:`StorageError` (never "start afresh")."""
    if not is_remote(uri) and Path(local_dir).resolve() == local_path(uri).resolve():
        return 0
    return download_dir(uri, local_dir, exclude)


# ------------------------------------------------------------------ URIs and the node cache
#
# The run directory may be a local path, a shared volume or any URI pyarrow.fs opens
# (``s3://bucket/runs?endpoint_override=host%3Aport&scheme=http``). Workers never receive a
# driver-local path: they get a *reference* ``{"uri": ..., "checksums": {...}}`` and fetch
# it into a node-local cache keyed by those checksums (:func:`materialize`).


class StorageError(OSError):
    """A storage operation failed for a reason other than "not found": the job stops."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p?x=1`` -> (``s3://b/p``, ``?x=1``): paths are joined before the query."""
    base, sep, query = str(uri).partition("?")
    return base, (sep + query if sep else "")


def uri_join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URI or local path, keeping a URI's query string at the end."""
    base, query = split_uri(str(uri))
    for p in parts:
        p = str(p).strip("/")
        if p:
            base = base.rstrip("/") + "/" + p
    return base + query


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(uri))
    except Exception as exc:  # noqa: BLE001 - any backend error is the same to the user
        raise StorageError(f"storage {redact(uri)} cannot be opened: {exc}") from exc


def redact(uri: str | os.PathLike) -> str:
    """The URI without a query string (it may carry keys) for messages."""
    base, query = split_uri(str(uri))
    return base + ("?…" if query else "")


def _info(fs: Any, path: str, uri: str) -> Any:
    try:
        return fs.get_file_info(path)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"storage {redact(uri)}: {type(exc).__name__}: {exc}") from exc


def uri_exists(uri: str | os.PathLike) -> bool:
    """True when a file or directory is at ``uri``; False only for "not found"; any other
    storage error (no permission, no such bucket, unreachable endpoint) raises StorageError."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return _info(fs, path, str(uri)).type != pafs.FileType.NotFound


def list_files(uri: str | os.PathLike) -> dict[str, int]:
    """Relative name -> size of every file under the directory ``uri`` ({} when absent)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if _info(fs, path, str(uri)).type == pafs.FileType.NotFound:
        return {}
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"storage {redact(uri)}: listing failed: {exc}") from exc
    root = path.rstrip("/") + "/"
    return {i.path[len(root):]: i.size for i in infos if i.type == pafs.FileType.File}


def _skipped(rel: str, exclude: tuple[str, ...]) -> bool:
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude)


def _write_stream(src: Any, uri: str, what: str) -> None:
    """Copy the readable ``src`` to the file ``uri`` (its folder is created)."""
    fs, dst = filesystem(uri)
    try:
        fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(dst) as out:
            shutil.copyfileobj(src, out, _CHUNK)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"upload of {what} to {redact(uri)} failed: {exc}") from exc


def upload_file(local: str | os.PathLike, uri: str) -> None:
    """Copy one local file to the file ``uri`` (its folder is created)."""
    try:
        src = open(local, "rb")
    except OSError as exc:
        raise StorageError(f"upload of {Path(local).name} to {redact(uri)} failed: {exc}") from exc
    with src:
        _write_stream(src, uri, Path(local).name)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to the file ``uri`` (its folder is created)."""
    _write_stream(io.BytesIO(data), uri, f"{len(data)} bytes")


def upload_dir(local_dir: str | os.PathLike, uri: str, exclude: tuple[str, ...] = ()) -> int:
    """Copy every file under ``local_dir`` to the directory ``uri`` (file by file, so a
    failure names the file); returns the number of files. ``exclude``: relative prefixes."""
    root = Path(local_dir)
    n = 0
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and not _skipped(rel, exclude):
            upload_file(f, uri_join(uri, rel))
            n += 1
    return n


def download_dir(uri: str, local_dir: str | os.PathLike, exclude: tuple[str, ...] = ()) -> int:
    """Copy the directory ``uri`` into ``local_dir``; returns the number of files (0 when
    ``uri`` does not exist: only "not found" means "nothing there")."""
    fs, base = filesystem(uri)
    files = list_files(uri)
    root = Path(local_dir)
    for rel in sorted(files):
        if _skipped(rel, exclude):
            continue
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.dl-{uuid.uuid4().hex[:8]}")
        try:
            with fs.open_input_stream(base.rstrip("/") + "/" + rel) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, dst)
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise StorageError(f"download of {rel} from {redact(uri)} failed: {exc}") from exc
    return len(files)


def delete_dir(uri: str) -> None:
    """Remove the directory ``uri`` and everything in it (absent: nothing to do)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if _info(fs, path, uri).type == pafs.FileType.NotFound:
        return
    try:
        fs.delete_dir(path)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"storage {redact(uri)}: delete failed: {exc}") from exc


def make_ref(uri: str, checksums: dict[str, str], file: str | None = None, local: str | None = None) -> dict:
    """A reference a worker can resolve anywhere: the directory ``uri``, the checksums of its
    files (the cache key and the integrity check), optionally one ``file`` inside it, and the
    driver's own copy (``local``, for checks on the driver only; workers never read it)."""
    return {"uri": str(uri), "checksums": dict(checksums), "file": file, "local": local}


def driver_path(x: str | os.PathLike | dict) -> Path:
    """The driver's own copy of a path or reference (for checks before any worker starts)."""
    if isinstance(x, dict) and x.get("local"):
        p = Path(x["local"])  # a reference to one file may carry its folder as the local path
        return p / x["file"] if x.get("file") and p.is_dir() else p
    return materialize(x)


def worker_ref(x: str | os.PathLike | dict) -> Any:
    """What a worker receives: a reference without the driver's path, or a plain path made
    absolute (it must then be shared: a run on one machine or a shared volume)."""
    if isinstance(x, dict):
        return {k: v for k, v in x.items() if k != "local"}
    return str(Path(x).resolve())


def ref_label(x: str | os.PathLike | dict) -> str:
    """How an input is named in records and messages: its URI (no query) or its path."""
    if isinstance(x, dict):
        return redact(uri_join(x["uri"], x["file"]) if x.get("file") else x["uri"])
    return str(x)


def cache_root() -> Path:
    """The node-local cache (``$CBD_CACHE_DIR``, default ~/.cache/cbd_ray/store)."""
    return Path(os.environ.get("CBD_CACHE_DIR", Path.home() / ".cache" / "cbd_ray" / "store"))


def _ref_key(ref: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(ref["checksums"]):
        h.update(name.encode() + b"\0" + ref["checksums"][name].encode() + b"\0")
    return h.hexdigest()[:40]


def materialize(ref: str | os.PathLike | dict) -> Path:
    """A local path for ``ref`` on this node. A plain path is returned as it is (it must be
    shared with the driver: a local run on one machine or a shared volume). A reference to
    a local directory is used in place; one to a remote URI is fetched once per node into
    the cache under its checksums' key and verified, so a corrupt or changed file is never
    used. Safe against concurrent workers on one node (rename into place)."""
    if not isinstance(ref, dict):
        return Path(ref)
    if not is_remote(ref["uri"]):
        base = local_path(ref["uri"])
        return base / ref["file"] if ref.get("file") else base
    final = cache_root() / _ref_key(ref)
    if not (final / ".complete").is_file():
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            _fetch_verified(ref, tmp)
            (tmp / ".complete").write_text(ref["uri"] + "\n")
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another worker on this node finished first
                if not (final / ".complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / ref["file"] if ref.get("file") else final


def _fetch_verified(ref: dict, tmp: Path) -> None:
    fs, base = filesystem(ref["uri"])
    tmp.mkdir(parents=True)
    for rel, digest in sorted(ref["checksums"].items()):
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with fs.open_input_stream(base.rstrip("/") + "/" + rel) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"fetching {rel} from {redact(ref['uri'])} failed: {exc}") from exc
        if file_sha256(dst) != digest:
            raise StorageError(f"{rel} in {redact(ref['uri'])} does not match its recorded checksum")
