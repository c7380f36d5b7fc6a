"""Cheap checks of a model directory, run on the driver before Ray starts.

A model directory an input names is opened just enough to find what would otherwise fail
minutes later inside a Ray worker: ``config.json`` parsed, every safetensors file's header
parsed and its size compared with the data the header promises (a truncated download or a
cut-short copy is caught here), and a tokenizer present where one is needed. No torch, no
transformers: a check costs milliseconds whatever the model's size.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from cbd_ray.errors import CheckpointError

#: a safetensors header larger than this is corrupt (the format caps it at 100 MB)
_MAX_HEADER = 100 * 1024 * 1024

#: any of these beside the weights is a tokenizer transformers can load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def check_safetensors(path: Path, role: str = "model") -> int:
    """Parse one safetensors file's header and check the file holds every byte it promises.
    Returns the number of tensors. CheckpointError naming the file otherwise."""
    size = path.stat().st_size
    where = f"{role} weights {path}"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{where} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{where}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{where}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object (corrupt file)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r} has no valid data_offsets (corrupt file)") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{where} is truncated: its header promises {8 + n + end} bytes, the file has {size}; "
                              "copy or download it again")
    return len(header) - ("__metadata__" in header)


def _weight_files(p: Path, role: str) -> list[Path]:
    """The safetensors files of a model directory (a shard index's files when there is one)."""
    index = p / "model.safetensors.index.json"
    if index.is_file() and not (p / "model.safetensors").is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(wmap.values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{role} model {p}: {index.name} is not a valid shard index") from None
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise CheckpointError(f"{role} model {p}: shard {missing[0]} named in {index.name} is missing")
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        bins = [f.name for f in p.glob("*.bin")]
        hint = f" (found {bins[0]}: pickled weights are never loaded; convert to safetensors)" if bins else ""
        raise CheckpointError(f"{role} model {p} has no *.safetensors weights{hint}")
    return files


def check_model_dir(path: str | os.PathLike, role: str = "model", tokenizer: bool = True) -> Path:
    """Check a Hugging Face model directory cheaply (see the module doc); returns its path.

    ``role`` names it in the one-line CheckpointError ("student", "teacher", "small anchor").
    ``tokenizer=False`` accepts a directory without tokenizer files (a teacher that shares
    the student's tokenizer, an anchor whose pair has one).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{role} model {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{role} model {p} is not a directory (give the model's folder)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{role} model {p} has no config.json")
    files = _weight_files(p, role)
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{role} model {cfg} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{role} model {cfg} has no model_type: not a transformers config")
    for f in files:
        check_safetensors(f, role)
    if tokenizer and not any((p / t).is_file() for t in TOKENIZER_FILES):
        raise CheckpointError(f"{role} model {p} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return p
