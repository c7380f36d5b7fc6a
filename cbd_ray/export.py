"""Edge export of a model directory: ONNX (``torch.onnx``) and GGUF (the ``gguf`` package, the
file format of llama.cpp).

ONNX: the causal LM's forward (``input_ids`` [batch, seq] -> ``logits`` [batch, seq, vocab],
no KV cache) exported with dynamic batch and sequence axes, then checked by running
onnxruntime and transformers on the same tokens: the max |logit difference| is recorded.

GGUF: float32 tensors under llama.cpp's names (``gguf.get_tensor_name_map``), with the
transformations llama.cpp's own converter applies (GPT-2's Conv1D weights transposed to
[out, in]; Llama's q/k rows permuted for its rotary layout), the hyperparameters and the
BPE tokenizer (tokens, merges, special ids) as metadata. Families: gpt2, llama, qwen2,
qwen3. The file is checked by reading it back with ``gguf.GGUFReader`` tensor by tensor
against what was meant to be written.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from cbd_ray.errors import CBDError

log = logging.getLogger(__name__)
FORMATS = ("onnx", "gguf")
#: transformers architecture -> gguf MODEL_ARCH member
GGUF_ARCH = {"GPT2LMHeadModel": "GPT2", "LlamaForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2",
             "Qwen3ForCausalLM": "QWEN3"}


def _load(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, torch_dtype="float32",
                                                 trust_remote_code=False)
    return cfg, model.eval()


class _LogitsOnly:
    """A module view of the model: input_ids -> logits (no cache, no dict output)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any) -> Any:
                return self.model(input_ids=input_ids, use_cache=False).logits

        return Wrapped().eval()


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike, seq_len: int = 16) -> dict[str, Any]:
    """Export to ONNX and check it with onnxruntime; returns {"format", "path", "bytes",
    "max_abs_logit_diff", "checked_on"}."""
    import numpy as np
    import onnxruntime as ort
    import torch

    cfg, model = _load(model_dir)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    wrapped = _LogitsOnly(model)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=max(seq_len + 1, _positions(cfg)))
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(wrapped, (ids,), str(out), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}}, dynamo=True, external_data=False)
        ref = wrapped(ids).numpy()
    check = ids[:1, : seq_len // 2]  # another shape than the one traced: the axes are dynamic
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    diff = 0.0
    for x, want in ((ids, ref), (check, wrapped(check).detach().numpy())):
        got = sess.run(["logits"], {"input_ids": x.numpy().astype(np.int64)})[0]
        diff = max(diff, float(np.abs(got - want).max()))
    log.info("onnx: %s (%s bytes), max |logit diff| vs transformers %.3g", out, f"{out.stat().st_size:,}", diff)
    return {"format": "onnx", "path": str(out), "bytes": out.stat().st_size, "max_abs_logit_diff": diff,
            "checked_on": [list(ids.shape), list(check.shape)]}


def _positions(cfg: Any) -> int:
    from cbd_ray.cards import positions

    return positions(cfg) or 2048


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout for Llama q/k rows: [n_head, 2, d/2, *] -> [n_head, d/2, 2, *]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(arch: str, cfg: Any, state: dict[str, Any]) -> dict[str, Any]:
    """{llama.cpp name: float32 numpy array} from a transformers state dict, transformed as
    llama.cpp's converter does for ``arch``."""
    import gguf
    import numpy as np

    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    out: dict[str, Any] = {}
    for name, t in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CBDError(f"gguf export: no llama.cpp name for tensor {name} of a {arch} model")
        a = t.detach().float().cpu().numpy()
        if arch == "GPT2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            a = a.T  # Conv1D stores [in, out]; llama.cpp wants [out, in]
        if arch == "LLAMA" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = _permute(a, heads if "q_proj" in name else kv)
        out[new] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def _tokenizer_meta(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges and special ids of a byte-level BPE ``tokenizer.json``."""
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text())
    if tj.get("model", {}).get("type") != "BPE":
        raise CBDError(f"gguf export: {model_dir}/tokenizer.json is not a BPE tokenizer")
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    vocab.update(special)
    by_id = {i: tok for tok, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if tokens[i] in special else
             gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _write_hparams(w: Any, arch: str, cfg: Any) -> None:
    heads = cfg.num_attention_heads
    w.add_context_length(_positions(cfg))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                              or 4 * cfg.hidden_size)
    w.add_head_count(heads)
    if arch == "GPT2":
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        w.add_rope_freq_base(float(theta or 10000.0))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(0)  # all float32


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, Any]:
    """Write a GGUF file and read it back; returns {"format", "path", "bytes", "tensors", "arch"}."""
    import gguf
    import numpy as np

    d = Path(model_dir)
    cfg, model = _load(d)
    arch = GGUF_ARCH.get((cfg.architectures or ["?"])[0])
    if arch is None:
        raise CBDError(f"gguf export: {cfg.architectures} is not a family this exporter writes for llama.cpp; "
                       f"supported: {', '.join(GGUF_ARCH)}")
    tensors = gguf_tensors(arch, cfg, model.state_dict())
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    w.add_name(d.resolve().name)
    _write_hparams(w, arch, cfg)
    tok = _tokenizer_meta(d, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(getattr(cfg, key, None), int):
            add(getattr(cfg, key))
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))) for t in gguf.GGUFReader(str(out)).tensors}
    bad = [n for n, a in tensors.items() if n not in back or not np.array_equal(back[n].reshape(a.shape), a)]
    if bad or set(back) != set(tensors):
        raise CBDError(f"gguf export: {out} reads back differently for {', '.join(bad[:5]) or 'its tensor list'}")
    log.info("gguf: %s (%s bytes, %d tensors read back equal)", out, f"{out.stat().st_size:,}", len(tensors))
    return {"format": "gguf", "path": str(out), "bytes": out.stat().st_size, "tensors": len(tensors), "arch": arch}


EXPORTERS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "onnx": lambda model, out: export_onnx(model, out / "model.onnx"),
    "gguf": lambda model, out: export_gguf(model, out / "model.gguf"),
}


def check_formats(formats: list[str]) -> list[str]:
    """The formats, each checked against FORMATS (one clear error before any work)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise CBDError(f"export format {', '.join(bad)} unknown; allowed: {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, formats: list[str]) -> list[dict[str, Any]]:
    """Export ``model_dir`` in each format into ``out_dir`` (which must not hold them yet)."""
    out = Path(out_dir)
    formats = check_formats(formats)
    clash = [out / f"model.{f}" for f in formats if (out / f"model.{f}").exists()]
    if clash:
        raise FileExistsError(f"{clash[0]} exists; choose another --out (nothing is overwritten)")
    try:
        return [EXPORTERS[f](Path(model_dir), out) for f in formats]
    except ImportError as exc:
        raise CBDError(f"export needs {exc.name or 'onnx, onnxruntime, onnxscript and gguf'}: "
                       "pip install 'cbd-ray[export]'") from exc


def exports_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of exported files: model, format, file, size, check."""
    lines = ["| model | format | file | size | check |", "|---|---|---|---|---|"]
    for r in records:
        check = (f"max abs logit diff {r['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in r
                 else f"{r.get('tensors', 0)} tensors read back equal")
        lines.append(f"| {r.get('model', '')} | {r['format']} | `{Path(r['path']).name}` | "
                     f"{r['bytes'] / 1e6:,.2f} MB | {check} |")
    return "\n".join(lines) + "\n"


def export_targets(targets: list[dict[str, Any]], out_dir: str | os.PathLike,
                   formats: list[str]) -> list[dict[str, Any]]:
    """Export every target (``name``, ``path``: a local path or a storage reference) into
    ``out_dir/<name>/``; writes ``exports.json`` and ``exports.md`` there and returns the
    records (``model``, ``format``, ``path`` relative to ``out_dir``, ``bytes``, check)."""
    from cbd_ray.storage import atomic_write_json, atomic_write_text, materialize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for t in targets:
        for r in export_model(materialize(t["path"]), out / t["name"], formats):
            records.append({"model": t["name"], **r, "path": str(Path(r["path"]).relative_to(out))})
    atomic_write_json(out / "exports.json", records)
    atomic_write_text(out / "exports.md", exports_table(records))
    return records


def export_task(out: str, device: str, targets: list[dict[str, Any]], formats: list[str]) -> list[dict[str, Any]]:
    """The chain's export stage as one task (``cbd_ray.stages.worker.produce``: ``fn(out, device, *args)``);
    export runs on the CPU whatever ``device`` the task got."""
    return export_targets(targets, out, formats)


def exports_section(run_dir: str | os.PathLike) -> list[Any]:
    """The report's "Exports" section when the run exported its targets (else nothing)."""
    from cbd_ray.report import Section

    path = Path(run_dir) / "exports" / "exports.json"
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    listed = [{**r, "path": f"exports/{r['path']}"} for r in records]
    return [Section("Exports", "Edge formats of the targets (`grid.export`), each checked after writing; "
                    "files under `exports/<target>/`.\n\n" + exports_table(listed))]
