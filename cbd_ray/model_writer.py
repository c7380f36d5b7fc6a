"""Writing a resized or blended model directory, tensor by tensor.

Interpolation (:mod:`cbd_ray.interpolate`) and alignment (:mod:`cbd_ray.align`) both end here:
every tensor of the target is resized from its anchors (:mod:`cbd_ray.resize`), blended and
streamed into safetensors (sharded, with an index, above ``MAX_SHARD_BYTES``), so memory stays
near one tensor of each anchor. The directory is written with
:func:`cbd_ray.storage.atomic_directory` and holds, beside the weights, ``config.json``, the
anchors' generation config and tokenizer, a model card (``README.md``) and ``cbd.json`` (the
provenance, with the sha256 of every other file).
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cbd_ray.arch import Shape, TensorSpec, adapter_for
from cbd_ray.cards import fit_tokenizer_dir, identity, target_card
from cbd_ray.resize import Checkpoint, ResizePlan, add_resized_, resize_tensor
from cbd_ray.storage import atomic_directory, atomic_write_json, atomic_write_text, dir_checksums

__all__ = ["MAX_SHARD_BYTES", "write_safetensors", "write_model"]

log = logging.getLogger(__name__)

#: outputs larger than this are written in several safetensors shards plus an index
MAX_SHARD_BYTES = 2 * 1024**3


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[int], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Stream tensors into one safetensors file without holding them all: the header is
    written from the known (name, shape, dtype) entries, then ``produce(i)`` is called for
    each entry in order and its bytes appended. Returns the bytes written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    off = 0
    for name, shape, dtype in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the format aligns the data section to 8 bytes
    # A writer thread overlaps the file writes with producing the next tensor (both release
    # the GIL); the bounded queue keeps at most two finished tensors in memory.
    pending: queue.Queue = queue.Queue(maxsize=2)
    failed: list[BaseException] = []

    def write_all(f) -> None:
        while (buf := pending.get()) is not None:
            if not failed:
                try:
                    f.write(buf)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the producer
                    failed.append(exc)

    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        writer = threading.Thread(target=write_all, args=(f,), name="safetensors-writer", daemon=True)
        writer.start()
        try:
            for i, (name, shape, dtype) in enumerate(entries):
                if failed:
                    break
                t = produce(i)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
                pending.put(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        finally:
            pending.put(None)
            writer.join()
        if failed:
            raise failed[0]
    return 8 + len(hb) + off


def _version() -> str:
    from cbd_ray import __version__  # the package's own version, read when a model is written

    return __version__


def write_model(out: Path, shape: Shape, ckpts: list[Checkpoint], plans: list[ResizePlan | None],
                per_layer: list[float], a_outer: float, overwrite: bool,
                meta: Callable[[], dict[str, Any]]) -> None:
    """Resize and blend every tensor, streaming them into ``out`` (atomically).
    ``ckpts[0]`` gets weight α, ``ckpts[1]`` weight 1 − α; a checkpoint whose plan is None
    has weight 0 everywhere and is never read."""
    base = ckpts[0]
    config = base.adapter.config_for(base.config, shape)
    adapter = adapter_for(config)
    dtype = base.dtype
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    jobs: list[tuple[TensorSpec, int | None]] = []
    for spec in adapter.stored():
        for layer in range(shape.layers) if spec.per_layer else [None]:
            entries.append((spec.name_at(layer), adapter.tensor_shape(spec, shape), dtype))
            jobs.append((spec, layer))
    hd = adapter.head_dim
    n_layers = shape.layers
    last_report = [time.perf_counter()]

    def resized(k: int, spec: TensorSpec, layer: int | None) -> tuple[torch.Tensor, bool]:
        """The resized tensor and whether it is a fresh buffer of our own (not a view of
        the anchor's memory-mapped file, which later reads of the same tensor share)."""
        plan = plans[k]
        src_layer = plan.layers[layer][0] if layer is not None else None
        src = ckpts[k].tensor(spec, src_layer)
        out = resize_tensor(src, spec, plan, layer, hd)
        return out, out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()

    def produce(i: int) -> torch.Tensor:
        spec, layer = jobs[i]
        a = per_layer[layer] if layer is not None else a_outer
        if a == 1.0:
            t = resized(0, spec, layer)[0]
        elif a == 0.0:
            t = resized(1, spec, layer)[0]
        else:
            # blend in float32 whatever the storage dtype (bf16 sums lose bits):
            # (1 − α)·T(L) + α·T(S), in place when T(L) is a buffer of our own (never into
            # the anchor's memory-mapped file); T(S) is added box by box when it is the small
            # anchor zero-padded, so the padded copy is never built
            tl, own = resized(1, spec, layer)
            t = tl.mul_(1.0 - a) if own and tl.dtype == torch.float32 else tl.float() * (1.0 - a)
            plan, src_layer = plans[0], (plans[0].layers[layer][0] if layer is not None else None)
            src = ckpts[0].tensor(spec, src_layer)
            if not add_resized_(t, src, spec, plan, layer, hd, a):
                t.add_(resize_tensor(src, spec, plan, layer, hd), alpha=a)
        now = time.perf_counter()
        if now - last_report[0] > 10:
            last_report[0] = now
            log.info("  %s: tensor %d/%d (layer %s of %d)", out.name, i + 1, len(jobs), layer, n_layers)
        return t.to(dtype)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        shards = _shards(entries, MAX_SHARD_BYTES)
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", entries, produce)
        else:
            weight_map = {}
            for j, idx in enumerate(shards):
                fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, [entries[i] for i in idx], lambda k, idx=idx: produce(idx[k]))
                weight_map.update({entries[i][0]: fname for i in idx})
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": sum(_nbytes(e) for e in entries)}, "weight_map": weight_map})
        _finish_model_dir(tmp, config, ckpts, {"format": "cbd-ray interpolated model", "cbd_ray_version": _version(),
                                               **meta(), "dtype": str(dtype).replace("torch.", "")})


def _finish_model_dir(tmp: Path, config: Any, ckpts: list[Checkpoint], meta: dict[str, Any]) -> None:
    """Everything beside the weights: config, generation config and tokenizer from the
    anchors (the small one's first), README.md, and cbd.json with the sha256 of every other
    file (a later run reuses this output only when they still match)."""
    config.save_pretrained(tmp)
    gen = next((c.path / "generation_config.json" for c in ckpts if (c.path / "generation_config.json").is_file()), None)
    if gen is not None:  # the small anchor's, else the large one's
        shutil.copy2(gen, tmp / "generation_config.json")
    tok_src = ckpts[0] if ckpts[0].tokenizer_files() else ckpts[-1]
    for f in tok_src.tokenizer_files():
        shutil.copy2(f, tmp / f.name)
    fit_tokenizer_dir(tmp)
    for k in ("small", "large"):  # names and Hub ids for the card (the anchors as given, not an aligned
        meta["anchors"][k].update(identity(Path(meta["anchors"][k]["path"])))  # copy); no machine paths there
    atomic_write_text(tmp / "README.md", target_card(meta).content)
    meta["files"] = dir_checksums(tmp)
    atomic_write_json(tmp / "cbd.json", meta)


def _nbytes(entry: tuple[str, tuple[int, ...], torch.dtype]) -> int:
    return math.prod(entry[1]) * torch.empty((), dtype=entry[2]).element_size()


def _shards(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], limit: int) -> list[list[int]]:
    """Consecutive groups of entry indices, each at most ``limit`` bytes (a larger single
    tensor gets a shard of its own)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, e in enumerate(entries):
        n = _nbytes(e)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups
