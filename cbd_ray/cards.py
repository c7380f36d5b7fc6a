"""Hub-ready model directories: model cards written with ``huggingface_hub`` and tokenizers
whose ``model_max_length`` is the model's window.

A card's YAML front matter (``ModelCard.load(dir).data``) has ``license`` (the anchors'
license when their cards say and agree, else ``other`` with ``license_name: unknown``),
``base_model`` (the anchors' Hub ids when known: a Hub checkpoint's ``model.json`` or a
config ``_name_or_path`` of the form ``org/name``; else their names in the run, never a
machine path), ``tags``, ``library_name: transformers`` and ``pipeline_tag:
text-generation``. The body gives how the model was made (α, shapes) and its evaluation
when known. Only light imports at the top: the CLI imports this module for ``cbd push``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

TAGS = ["cbd", "chain-based-distillation", "distillation"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def positions(config: Any) -> int | None:
    """The model's window in tokens (``n_positions`` / ``max_position_embeddings``)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def fit_tokenizer(tokenizer: Any, config: Any) -> Any:
    """Set ``tokenizer.model_max_length`` to the model's window before it is saved, so
    truncation=True cuts prompts to what the position table holds. Returns the tokenizer."""
    n = positions(config)
    if n is not None:
        tokenizer.model_max_length = n
    return tokenizer


def fit_tokenizer_dir(model_dir: str | os.PathLike) -> None:
    """The same for tokenizer files copied into ``model_dir`` (tokenizer_config.json)."""
    d = Path(model_dir)
    n = positions(_json(d / "config.json"))
    tc = d / "tokenizer_config.json"
    if n is None or not tc.is_file():
        return
    data = _json(tc)
    if data.get("model_max_length") != n:
        data["model_max_length"] = n
        tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def hub_id(model_dir: str | os.PathLike) -> str | None:
    """The Hub id of the model in ``model_dir`` when known, else None."""
    d = Path(model_dir)
    ref = _json(d / "model.json")
    if ref.get("kind") == "hub" and isinstance(ref.get("name"), str):
        return ref["name"]
    made = _json(d / "cbd.json")
    if isinstance(made.get("hub_id"), str):
        return made["hub_id"]
    name = _json(d / "config.json").get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def identity(model_dir: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """How a card names a model: ``{"name": its name in the run, "hub_id": or None,
    "license": from its card or None}``; the name is the directory's name."""
    if isinstance(model_dir, dict):  # a storage reference ({"uri", "file"?}): named by its last part
        model_dir = str(model_dir.get("uri", "model")).rstrip("/")
    d = Path(model_dir)
    if "://" in str(model_dir):
        return {"name": d.name, "hub_id": None, "license": None}
    hid = hub_id(d)
    return {"name": d.resolve().name, "hub_id": hid, "license": card_license(d)}


def card_license(model_dir: str | os.PathLike) -> str | None:
    """The ``license`` of the model card in ``model_dir`` (None without one)."""
    from huggingface_hub import ModelCard

    p = Path(model_dir) / "README.md"
    if not p.is_file():
        return None
    try:
        lic = ModelCard.load(p).data.license
    except Exception:  # noqa: BLE001 - a malformed card is a card without a license
        return None
    return lic if isinstance(lic, str) else None


def card_data(name: str, parents: Sequence[dict[str, Any]]) -> Any:
    """ModelCardData for a model derived from ``parents`` (identities, see :func:`identity`)."""
    from huggingface_hub import ModelCardData

    lics = {p.get("license") for p in parents}
    known = next(iter(lics)) if len(lics) == 1 and None not in lics else None
    known = None if known == "other" else known  # an "other" license of an anchor is unknown here too
    extra = {} if known else {"license_name": "unknown"}
    bases = list(dict.fromkeys(p.get("hub_id") or p["name"] for p in parents))
    return ModelCardData(license=known or "other", base_model=bases or None, tags=list(TAGS),
                         library_name="transformers", pipeline_tag="text-generation", model_name=name, **extra)


def _shape_row(label: str, s: dict[str, Any], params: int | None) -> str:
    kv = s.get("kv_heads") or s.get("heads")
    p = f"{params:,}" if isinstance(params, int) else "?"
    return f"| {label} | {s.get('layers')} | {s.get('hidden')} | {s.get('heads')} | {kv} | {s.get('ffn')} | {p} |"


def evaluation_lines(rows: Sequence[dict[str, Any]] | None) -> list[str]:
    """A markdown table of evaluation rows (``task`` and ``metrics`` or flat metric keys)."""
    if not rows:
        return ["Not evaluated yet: `cbd evaluate --model DIR --tasks ...` or the run's report.md."]
    lines = ["| task | metric | value |", "|---|---|---|"]
    for r in rows:
        metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {
            k: v for k, v in r.items() if k not in ("task", "model", "kind", "path", "n", "seconds")}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"| {r.get('task', '')} | {k} | {v:.4g} |")
    return lines


def _usage(name: str) -> list[str]:
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"path = \"{name}\"  # this directory, or the Hub repo it was pushed to",
            "model = AutoModelForCausalLM.from_pretrained(path)",
            "tokenizer = AutoTokenizer.from_pretrained(path)", "```", ""]


def target_card(meta: dict[str, Any], evaluation: Sequence[dict[str, Any]] | None = None) -> Any:
    """The card of an interpolated model from its ``cbd.json`` record (anchors carry their
    ``name``/``hub_id``/``license`` there, see :func:`identity`)."""
    from huggingface_hub import ModelCard

    anchors = meta["anchors"]
    parents = [anchors[k] for k in ("small", "large")]
    if parents[0].get("name") == parents[1].get("name"):
        parents = parents[:1]
    alpha = meta["alpha"]
    a_txt = f"{alpha:.4f}" if isinstance(alpha, float) else f"per-layer schedule {alpha}"
    r = meta["resize"]
    body = [
        f"# {meta['name']}", "",
        f"A {meta['family']} model made by cbd-ray {meta.get('cbd_ray_version', '')} by interpolating two anchors "
        "of one distillation chain (Chain-based Distillation): both anchors are resized to this shape "
        "and blended, θ = α·T(θ_small) + (1 − α)·T(θ_large). It has not been trained after interpolation.", "",
        "| | layers | hidden | heads | kv_heads | ffn | parameters |", "|---|---|---|---|---|---|---|",
        _shape_row("**this model**", meta["target"], meta.get("params")),
        *[_shape_row(f"{k} anchor `{anchors[k].get('hub_id') or anchors[k].get('name', k)}`", anchors[k]["shape"],
                     anchors[k].get("params")) for k in ("small", "large")], "",
        f"- α (weight of the small anchor): {a_txt}",
        f"- resizing: layers subset {r['layer_subset']} / expand {r['layer_expand']}; widths subset "
        f"{r['width_subset']} / expand {r['width_expand']}; calibration: {r['calib'] or 'none'}",
        "- anchors' weight files and their sha256, and the layer maps: `cbd.json`", "",
        "## Evaluation", "", *evaluation_lines(evaluation), "", "## Use", "", *_usage(meta["name"]),
    ]
    data = card_data(meta["name"], parents)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def distilled_card(name: str, teacher: dict[str, Any] | None, student: dict[str, Any], config: dict[str, Any],
                   metrics: dict[str, Any], shape: dict[str, Any] | None = None) -> Any:
    """The card of a distilled (or fine-tuned) model: an anchor of the chain, the SFT'd source."""
    from huggingface_hub import ModelCard

    # base_model: the teacher it was distilled from (its starting weights are named in the
    # body: often a pruned or random init in a work folder); the model itself for SFT
    parents = [teacher if teacher is not None else student]
    how = (f"distilled from `{teacher.get('hub_id') or teacher['name']}`" if teacher is not None
           and teacher["name"] != student["name"] else "fine-tuned")
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    body = [f"# {name}", "",
            f"A chain model made by cbd-ray (Chain-based Distillation): {how}, starting from "
            f"`{student.get('hub_id') or student['name']}`, with the `{config.get('objective')}` objective "
            f"({config.get('divergence', '')}, {config.get('steps')} steps).", ""]
    if shape:
        body += ["| layers | hidden | heads | kv_heads | ffn |", "|---|---|---|---|---|",
                 f"| {shape.get('layers')} | {shape.get('hidden')} | {shape.get('heads')} | "
                 f"{shape.get('kv_heads') or shape.get('heads')} | {shape.get('ffn')} |", ""]
    body += ["## Evaluation", "", *evaluation_lines([{"task": "distillation", "metrics": shown}] if shown else None),
             "", "Settings and training metrics: `distill.json`.", "", "## Use", "", *_usage(name)]
    return ModelCard(f"---\n{card_data(name, parents).to_yaml()}\n---\n\n" + "\n".join(body))


def pretrained_card(name: str, steps: int, tokens: int, final_loss: float | None) -> Any:
    """The card of a model trained from scratch here (the tiny source of the demo chains)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license="other", license_name="unknown", tags=list(TAGS), library_name="transformers",
                         pipeline_tag="text-generation", model_name=name)
    loss = f"{final_loss:.4g}" if final_loss is not None else "?"
    body = [f"# {name}", "", "A small language model trained from scratch by cbd-ray (next-token prediction) "
            "as the source of a Chain-based Distillation chain; its training text sets its license.", "",
            "## Evaluation", "", "| task | metric | value |", "|---|---|---|",
            f"| training | final loss | {loss} |", f"| training | steps | {steps} |",
            f"| training | tokens | {tokens:,} |", "", "## Use", "", *_usage(name)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_distilled_card(out: str | os.PathLike, name: str, teacher_dir: Any, student_dir: Any,
                         config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """The card of a distilled model written into ``out``; teacher == student means SFT."""
    same = str(teacher_dir) == str(student_dir)  # run_distill is given the student as teacher for SFT
    teacher = None if same else identity(teacher_dir)
    # the pipeline writes a stage into ".<name>.partial" and renames it when done
    name = re.sub(r"^\.(.+)\.partial$", r"\1", name)
    return write_card(out, distilled_card(name, teacher, identity(student_dir), config, metrics))


def write_card(model_dir: str | os.PathLike, card: Any) -> Path:
    """Save ``card`` as ``model_dir/README.md`` (the file the Hub shows)."""
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path
