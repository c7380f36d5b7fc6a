"""Ways to initialise a model of a target shape: CBD and the paper's baselines.

Each ``init_<method>(...)`` writes an ordinary Hugging Face model directory (safetensors,
tokenizer beside it, ``baseline.json`` with the provenance) and returns its path:

``cbd``            two-anchor interpolation (cbd_ray.interpolate.AnchorPair.make)
``rand``           random initialisation (the family's own Hugging Face init, seeded)
``single``         the anchor below the target expanded to the target shape, no blending
``prune``          the target cut straight from the source by the same subset rules
                   (cbd_ray.resize; Minitron-style when the options carry calibration text)
``direct_kd``      a random model of the target shape distilled straight from the source
                   (cbd_ray.train.run_distill), no chain
``prune_kd``       ``prune``, then distilled from the source as ``direct_kd`` is (Minitron)
``auto_learngene`` the first ``genes`` source layers at the bottom, random layers above
``van_learngene``  the last ``genes`` source layers at the top, random layers below

Learngene variants take their layers from the source after resizing its width (hidden,
heads, FFN) to the target's with the resize machinery; the source keeps its depth there,
so the copied layers are whole source layers. Embeddings, positions and the final norm come
from the same width-resized source (``inherit_embeddings``), as a model whose inherited
layers read random embeddings would learn nothing from them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from cbd_ray.errors import CBDError
from cbd_ray.interpolate import AnchorPair, ResizeOptions, Shape, parse_shape, resize_model

METHODS = ("cbd", "prune", "rand", "single", "direct_kd", "auto_learngene", "van_learngene", "prune_kd")
_LAYER = re.compile(r"^(.*?\.(?:h|layers|layer|blocks))\.(\d+)\.(.+)$")


def _prepare_out(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _provenance(out: Path, method: str, shape: Shape, **info: Any) -> None:
    from cbd_ray.storage import atomic_write_json

    atomic_write_json(out / "baseline.json", {"method": method, "shape": shape.as_dict(), **info})


def _publish(tmp: Path, out: Path) -> Path:
    """Move a finished model directory into place (rename: a crash leaves no half model)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _tmp_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def target_shape(model_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any]) -> Shape:
    """``shape`` completed the way resize_model completes it (kv_heads, ffn from the model)."""
    from cbd_ray.resize import Checkpoint

    ck = Checkpoint(model_dir)
    s = parse_shape(dict(shape) if isinstance(shape, Mapping) else shape)
    if not ck.adapter.has_gqa:
        s = Shape(s.layers, s.hidden, s.heads, None, s.ffn)
    elif s.kv_heads is None:
        s = Shape(s.layers, s.hidden, s.heads, max(1, s.heads * ck.shape.kv_heads // ck.shape.heads), s.ffn)
    if s.ffn is None:
        s = Shape(s.layers, s.hidden, s.heads, s.kv_heads, ck.shape.ffn * s.hidden // ck.shape.hidden)
    ck.adapter.check_shape(s)
    return s


# --------------------------------------------------------------------------- CBD, Single


def init_cbd(small_dir: str | os.PathLike, large_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any],
             out_dir: str | os.PathLike, alpha: float | str = "auto", resize: ResizeOptions | None = None,
             overwrite: bool = False, align: str = "auto") -> Path:
    """CBD: resize both anchors to ``shape`` and blend them with ``alpha`` (α on the smaller),
    the small anchor aligned to the large first when ``align`` says so (cbd_ray.align)."""
    pair = AnchorPair(small_dir, large_dir, resize=resize, align=align)
    s = parse_shape(dict(shape) if isinstance(shape, Mapping) else shape)
    out = Path(out_dir)
    rec = pair.make(s, out, alpha=alpha, overwrite=overwrite)
    _provenance(out, "cbd", Shape(**rec["shape"]), alpha=rec["alpha"], small=str(small_dir), large=str(large_dir),
                aligned=bool(rec.get("aligned")))
    return out


def init_single(small_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any], out_dir: str | os.PathLike,
                resize: ResizeOptions | None = None, overwrite: bool = False) -> Path:
    """Single: the anchor below the target expanded to ``shape`` (layer replication and zero
    padding by default), with no second anchor to blend."""
    s = target_shape(small_dir, shape)
    out = _prepare_out(out_dir, overwrite)
    resize_model(small_dir, s, out, resize=resize, overwrite=False)
    _provenance(out, "single", s, anchor=str(small_dir))
    return out


def init_prune(source_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any], out_dir: str | os.PathLike,
               resize: ResizeOptions | None = None, overwrite: bool = False) -> Path:
    """Prune: the source cut straight to ``shape`` by the subset rules of ``resize`` (the
    choice a user makes instead of a chain: one structural pruning of the large model)."""
    s = target_shape(source_dir, shape)
    out = _prepare_out(out_dir, overwrite)
    resize_model(source_dir, s, out, resize=resize, overwrite=False)
    _provenance(out, "prune", s, source=str(source_dir),
                resize=(resize or ResizeOptions()).describe())
    return out


# --------------------------------------------------------------------------- Rand


def _save_random(like_dir: str | os.PathLike, shape: Shape, out: Path, seed: int) -> None:
    """A randomly initialised model of ``shape`` with ``like_dir``'s family, vocabulary and
    settings (its config with the shape's axes changed), tokenizer copied beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    from cbd_ray.resize import Checkpoint

    ck = Checkpoint(like_dir)
    config = ck.adapter.config_for(ck.config, shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    for f in ck.tokenizer_files():
        shutil.copy2(f, out / f.name)
    if (ck.path / "generation_config.json").is_file() and not (out / "generation_config.json").is_file():
        shutil.copy2(ck.path / "generation_config.json", out / "generation_config.json")


def init_rand(like_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any], out_dir: str | os.PathLike,
              seed: int = 0, overwrite: bool = False) -> Path:
    """Rand: the family's random initialisation at ``shape`` (``torch.manual_seed(seed)``)."""
    s = target_shape(like_dir, shape)
    out = _prepare_out(out_dir, overwrite)
    tmp = _tmp_beside(out)
    try:
        _save_random(like_dir, s, tmp, seed)
        _provenance(tmp, "rand", s, seed=seed, like=str(like_dir))
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- Learngene


def learngene_layers(variant: str, source_layers: int, target_layers: int, genes: int) -> dict[int, int]:
    """{target layer: source layer} of the inherited layers. ``auto``: source layers
    0..k-1 become target layers 0..k-1; ``van``: the last k source layers become the last k
    target layers (k = min(genes, source_layers, target_layers))."""
    if variant not in ("auto", "van"):
        raise CBDError(f"learngene variant {variant!r} unknown; allowed: auto, van")
    if genes < 1:
        raise CBDError(f"learngene genes={genes} must be >= 1")
    k = min(genes, source_layers, target_layers)
    if variant == "auto":
        return {j: j for j in range(k)}
    return {target_layers - k + i: source_layers - k + i for i in range(k)}


def init_learngene(source_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any], out_dir: str | os.PathLike,
                   variant: str = "auto", genes: int = 3, seed: int = 0, inherit_embeddings: bool = True,
                   resize: ResizeOptions | None = None, overwrite: bool = False) -> Path:
    """Learngene: a random model of ``shape`` whose layers listed by :func:`learngene_layers`
    are copied from the source (width-resized to the target's hidden/heads/FFN first)."""
    import torch
    from safetensors.torch import load_file, save_file

    from cbd_ray.resize import Checkpoint

    s = target_shape(source_dir, shape)
    src = Checkpoint(source_dir)
    mapping = learngene_layers(variant, src.shape.layers, s.layers, genes)
    out = _prepare_out(out_dir, overwrite)
    tmp = _tmp_beside(out)
    work = _tmp_beside(out)
    try:
        wide = Shape(src.shape.layers, s.hidden, s.heads, s.kv_heads, s.ffn)
        resized = work / "source_resized"
        resize_model(source_dir, wide, resized, resize=resize)
        _save_random(source_dir, s, tmp, seed)
        weights = sorted(tmp.glob("*.safetensors"))
        if len(weights) != 1:
            raise CBDError(f"expected one safetensors file for a model of {s.label()}, found {len(weights)}")
        rand = load_file(str(weights[0]))
        src_t = load_file(str(resized / "model.safetensors"))
        out_t: dict[str, torch.Tensor] = {}
        copied: list[str] = []
        for name, t in rand.items():
            m = _LAYER.match(name)
            if m:
                j = int(m.group(2))
                if j in mapping:
                    sname = f"{m.group(1)}.{mapping[j]}.{m.group(3)}"
                    out_t[name] = _same_shape(src_t, sname, t)
                    copied.append(name)
                    continue
            elif inherit_embeddings and name in src_t:
                out_t[name] = _same_shape(src_t, name, t)
                copied.append(name)
                continue
            out_t[name] = t
        if not any(_LAYER.match(n) for n in copied):
            raise CBDError(f"no layer tensor of {source_dir} matched the target's names (layer pattern {_LAYER.pattern})")
        save_file({k: v.contiguous() for k, v in out_t.items()}, str(weights[0]), metadata={"format": "pt"})
        _provenance(tmp, f"{variant}_learngene", s, source=str(source_dir), seed=seed,
                    layers={str(k): v for k, v in mapping.items()}, inherit_embeddings=inherit_embeddings,
                    copied_tensors=len(copied))
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _same_shape(tensors: Mapping[str, Any], name: str, like: Any) -> Any:
    if name not in tensors:
        raise CBDError(f"the width-resized source has no tensor {name!r}")
    t = tensors[name]
    if tuple(t.shape) != tuple(like.shape):
        raise CBDError(f"tensor {name}: source {tuple(t.shape)} does not match the target's {tuple(like.shape)}")
    return t.to(like.dtype).clone()


def init_auto_learngene(source_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any],
                        out_dir: str | os.PathLike, genes: int = 3, seed: int = 0, **kw: Any) -> Path:
    """Auto-Learngene: the first ``genes`` source layers + random layers above them."""
    return init_learngene(source_dir, shape, out_dir, variant="auto", genes=genes, seed=seed, **kw)


def init_van_learngene(source_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any],
                       out_dir: str | os.PathLike, genes: int = 3, seed: int = 0, **kw: Any) -> Path:
    """Van-Learngene: random layers below + the last ``genes`` source layers on top."""
    return init_learngene(source_dir, shape, out_dir, variant="van", genes=genes, seed=seed, **kw)


# --------------------------------------------------------------------------- Direct KD


def init_direct_kd(source_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any], out_dir: str | os.PathLike,
                   data: str | os.PathLike, distill: Mapping[str, Any], eval_data: str | os.PathLike | None = None,
                   seed: int = 0, work_dir: str | os.PathLike | None = None, overwrite: bool = False,
                   log: Callable[[str], None] | None = None, lm_data: Any = None) -> Path:
    """Direct KD: a random model of ``shape`` distilled straight from the source on
    ``data`` (instruction JSONL) with the settings ``distill`` (cbd_ray.train.DistillConfig
    fields), through the same engine as a chain step. Returns the distilled model's
    directory; ``baseline.json`` records the engine's metrics (teacher tokens included)."""
    s = target_shape(source_dir, shape)
    return _distill_started("direct_kd", lambda start: _save_random(source_dir, s, start, seed), source_dir, s,
                            out_dir, data, distill, eval_data, seed, work_dir, overwrite, log, lm_data=lm_data)


def init_prune_kd(source_dir: str | os.PathLike, shape: Shape | str | Mapping[str, Any], out_dir: str | os.PathLike,
                  data: str | os.PathLike, distill: Mapping[str, Any], eval_data: str | os.PathLike | None = None,
                  seed: int = 0, resize: ResizeOptions | None = None, work_dir: str | os.PathLike | None = None,
                  overwrite: bool = False, log: Callable[[str], None] | None = None, lm_data: Any = None) -> Path:
    """Prune + KD, what a Minitron user does: the source cut to ``shape`` (as ``prune``) and
    then distilled from the source with ``distill``, the same engine and settings as
    ``direct_kd``, so both spend the same teacher tokens per target."""
    s = target_shape(source_dir, shape)

    def start(d: Path) -> None:
        resize_model(source_dir, s, d, resize=resize, overwrite=True)

    return _distill_started("prune_kd", start, source_dir, s, out_dir, data, distill, eval_data, seed, work_dir,
                            overwrite, log, lm_data=lm_data, resize=(resize or ResizeOptions()).describe())


def recover(blend_dir: str | os.PathLike, teacher_dir: str | os.PathLike, out_dir: str | os.PathLike,
            data: str | os.PathLike, distill: Mapping[str, Any], eval_data: str | os.PathLike | None = None,
            seed: int = 0, work_dir: str | os.PathLike | None = None, overwrite: bool = False,
            log: Callable[[str], None] | None = None, lm_data: Any = None) -> Path:
    """Recovery of a blended target (``grid.recover``): a short distillation of the model in
    ``blend_dir`` from ``teacher_dir``, its larger anchor (never the chain's source: CBD does
    not call the large model again), with ``distill``. ``baseline.json`` keeps the blend's
    provenance under ``blend`` and the engine's metrics (anchor-teacher tokens) beside it."""
    from cbd_ray.resize import Checkpoint

    s = Checkpoint(blend_dir).shape
    blend = json.loads((Path(blend_dir) / "baseline.json").read_text()) if (Path(blend_dir) / "baseline.json").is_file() else {}

    def start(d: Path) -> None:
        shutil.copytree(blend_dir, d, dirs_exist_ok=True)

    return _distill_started("recover", start, teacher_dir, s, out_dir, data, distill, eval_data, seed, work_dir,
                            overwrite, log, lm_data=lm_data, blend=blend, teacher=str(teacher_dir))


def _distill_started(method: str, make_start: Callable[[Path], None], teacher_dir: str | os.PathLike, s: Shape,
                     out_dir: str | os.PathLike, data: str | os.PathLike, distill: Mapping[str, Any],
                     eval_data: str | os.PathLike | None, seed: int, work_dir: str | os.PathLike | None,
                     overwrite: bool, log: Callable[[str], None] | None, lm_data: Any = None, **info: Any) -> Path:
    """Make a start model with ``make_start(dir)`` and distill it from ``teacher_dir`` on
    ``data`` with the settings ``distill`` (cbd_ray.train.DistillConfig fields), through the
    same engine as a chain step; ``baseline.json`` records the engine's metrics. ``lm_data``:
    MiniLLM's pretraining text, e.g. a corpus built once for many runs (cbd_ray.train.lm_corpus)."""
    from cbd_ray.config import build
    from cbd_ray.train import DistillConfig, run_distill

    cfg = build(DistillConfig, dict(distill), source=f"{method}.distill")
    out = _prepare_out(out_dir, overwrite)
    work = Path(work_dir) if work_dir else _tmp_beside(out)
    start = work / "init"
    if not (start / "config.json").is_file():
        if start.exists():
            shutil.rmtree(start)
        start.mkdir(parents=True)
        make_start(start)
    if log:
        log(f"{method}: {cfg.objective} {Path(teacher_dir).name} -> {s.label()} for {cfg.steps} steps")
    metrics = run_distill(str(teacher_dir), str(start), str(data), str(out), cfg,
                          eval_data=str(eval_data) if eval_data else None, storage_path=str(work / "ray_train"),
                          lm_data=lm_data)
    m = json.loads(json.dumps(dict(metrics or {}), default=str))
    _provenance(out, method, s, source=str(teacher_dir), seed=seed, distill=cfg.model_dump(mode="json"),
                metrics=m, **info)
    if not work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out
