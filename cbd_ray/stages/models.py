"""Models the chain starts from: tiny models built and pretrained here, checkpoints from a
hub or a directory, and randomly initialised students of a given shape.

``pretrain_lm`` is a plain-torch language-model loop over packed blocks of text with
checkpoints in a work directory, so a killed pretraining resumes where it stopped. The
chain job runs it as a Ray task (one CPU or GPU), the same function runs without Ray.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from cbd_ray.cards import fit_tokenizer, pretrained_card, write_card
from cbd_ray.errors import CheckpointError

# README.md: the Hub card, where the license the chain's own cards repeat comes from
_HUB_PATTERNS = ["README.md", "*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt", "vocab.*"]


def model_dir_of(stage_out: str | os.PathLike) -> str:
    """The model a model-producing stage made: its output directory when it holds a model,
    else the reference it recorded (``model.json``: a local directory or hub name)."""
    d = Path(stage_out)
    if (d / "config.json").is_file():
        return str(d)
    ref = d / "model.json"
    if ref.is_file():
        return json.loads(ref.read_text())["model"]
    raise CheckpointError(f"{d} holds no model (no config.json) and no model.json reference")


def read_text_source(spec: str, instructions: list[dict[str, str]] | None = None) -> str:
    """``builtin`` (Python's docs), ``instructions`` (the responses of the instruction
    records), or a path to a UTF-8 text file."""
    if spec == "builtin":
        from cbd_ray.tiny import builtin_text

        return builtin_text()
    if spec == "instructions":
        from cbd_ray.tiny import builtin_instructions

        recs = instructions if instructions is not None else builtin_instructions(400)
        return "\n\n".join(f"{r['instruction']}\n{r.get('context', '')}\n{r['response']}" for r in recs)
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"text source {spec!r} is neither 'builtin', 'instructions' nor a file")
    return p.read_text(encoding="utf-8")


def init_tiny(out_dir: str | os.PathLike, family: str, shape: dict[str, Any], tokenizer_text: str,
              vocab_size: int, max_positions: int, seed: int) -> Path:
    """Train a byte-level BPE on ``tokenizer_text`` and save a randomly initialised model of
    ``family``/``shape`` with it (safetensors, tokenizer beside it)."""
    from cbd_ray.tiny import train_bpe_tokenizer

    tok = train_bpe_tokenizer([tokenizer_text], vocab_size=vocab_size)
    return save_random(out_dir, family, shape, tok, max_positions, seed)


def save_random(out_dir: str | os.PathLike, family: str, shape: dict[str, Any], tokenizer: Any,
                max_positions: int, seed: int) -> Path:
    """A randomly initialised model of ``family`` and ``shape`` using ``tokenizer``'s vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    from cbd_ray.tiny import tiny_config

    shape = {k: v for k, v in shape.items() if v is not None and k in ("layers", "hidden", "heads", "kv_heads", "ffn")}
    cfg = tiny_config(family, vocab_size=len(tokenizer), max_positions=max_positions, **shape)
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    fit_tokenizer(tokenizer, cfg).save_pretrained(out)
    return out


def random_like(model_dir: str | os.PathLike, out_dir: str | os.PathLike, family: str, shape: dict[str, Any],
                seed: int) -> Path:
    """A random student of ``shape`` sharing the family, vocabulary and positions of the
    model in ``model_dir`` (the chain's source)."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 2048)
    return save_random(out_dir, family, shape, tok, positions, seed)


def fetch_checkpoint(name: str, out_dir: str | os.PathLike, copy: bool = False) -> dict[str, Any]:
    """A local model directory is referenced in place (``copy``: copied into ``out_dir``, as
    for a run in object storage, whose workers cannot see the driver's disk); a hub name is
    downloaded (weights as safetensors only) into ``out_dir``. Returns the model reference
    written to model.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = Path(name)
    if p.is_dir():
        if not (p / "config.json").is_file() or not list(p.glob("*.safetensors")):
            raise CheckpointError(f"model directory {p} needs config.json and *.safetensors weights")
        ref = {"model": str(p.resolve()), "kind": "directory"}
        if copy:  # the stage's own directory then holds the model, which model_dir_of finds first
            import shutil

            for f in p.iterdir():
                if f.is_file() and not f.name.endswith((".bin", ".pt", ".pth", ".pkl")):
                    shutil.copy2(f, out / f.name)
            ref = {"model": p.name, "kind": "copied directory"}
    else:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(repo_id=name, local_dir=str(out), allow_patterns=_HUB_PATTERNS)
        except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: all the same to the user
            raise CheckpointError(f"could not download {name!r} from the hub ({type(exc).__name__}: {exc}); "
                                  f"give a local directory or run where the hub is reachable") from exc
        if not list(out.glob("*.safetensors")):
            raise CheckpointError(f"{name!r} has no safetensors weights (only safetensors are loaded)")
        # the weights are in this stage's own directory, which model_dir_of finds first
        ref = {"model": name, "kind": "hub", "name": name}
    (out / "model.json").write_text(json.dumps(ref, indent=2) + "\n")
    return ref


def _blocks(ids: Any, seq_len: int, batch_size: int, generator: Any) -> Any:
    """A batch of random windows of ``seq_len + 1`` tokens: LongTensor [batch_size, seq_len + 1]."""
    import torch

    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def _schedule(steps: int, warmup: int | None) -> Callable[[int], float]:
    """The rate's factor at a step: warm-up then cosine (``warmup`` None: 10% of the steps),
    or warm-up over ``warmup`` steps then constant."""
    if warmup is not None:
        return lambda s: min(1.0, (s + 1) / max(1, warmup))
    warm = max(1, steps // 10)
    return lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))


def pretrain_lm(model_dir: str, text: str, out_dir: str, work_dir: str, steps: int, batch_size: int,
                seq_len: int, lr: float, checkpoint_every: int, seed: int = 0, device: str = "cpu",
                log: Callable[[str], None] | None = None, warmup: int | None = None,
                snapshots: dict[int, str] | None = None) -> dict[str, Any]:
    """Next-token training of the model in ``model_dir`` on ``text``; saves to ``out_dir``.

    Every ``checkpoint_every`` steps the model and optimizer go to ``work_dir/ckpt``
    (atomically); a rerun with the same ``work_dir`` continues from there. The rate warms up
    linearly, by default over the first 10% of steps followed by cosine decay; with
    ``warmup`` (steps) it is held constant after the warm-up, so the first k steps of a run
    are the same whatever its length and ``snapshots`` ({step: directory}: the model saved
    at that step) stand for shorter runs exactly. Returns student tokens, teacher tokens
    (0), the last losses and the steps done in this call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.storage import atomic_directory, atomic_write_json

    say = log or (lambda s: print(s, flush=True))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ckpt = Path(work_dir) / "ckpt"
    start_dir = ckpt if (ckpt / "state.json").is_file() else Path(model_dir)
    from cbd_ray.devices import resolve

    dev = resolve(device).torch_device()
    model = AutoModelForCausalLM.from_pretrained(start_dir, use_safetensors=True).to(dev)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", seq_len)
    seq_len = min(seq_len, positions - 1, ids.numel() - 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    step = 0
    if start_dir == ckpt:
        state = json.loads((ckpt / "state.json").read_text())
        step = int(state["step"])
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=dev))
        say(f"pretrain: resuming from step {step}/{steps}")
    sched = _schedule(steps, warmup)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    model.train()
    losses: list[float] = []
    first = step
    t0 = time.perf_counter()
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr * max(0.05, sched(step))
        batch = _blocks(ids, seq_len, batch_size, gen).to(dev)
        out = model(input_ids=batch, labels=batch)  # HF shifts labels: seq_len predictions a row
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        step += 1
        if step % max(1, steps // 10) == 0 or step == steps:
            rate = (step - first) * batch_size * seq_len / max(1e-9, time.perf_counter() - t0)
            say(f"pretrain: step {step}/{steps} loss {losses[-1]:.3f} ({rate:,.0f} tokens/s)")
        if snapshots and step in snapshots:
            model.save_pretrained(snapshots[step], safe_serialization=True)
            fit_tokenizer(tok, model.config).save_pretrained(snapshots[step])
        if step % checkpoint_every == 0 and step < steps:
            with atomic_directory(ckpt, overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                torch.save(opt.state_dict(), tmp / "optimizer.pt")
                atomic_write_json(tmp / "state.json", {"step": step})
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    fit_tokenizer(tok, model.config).save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    write_card(out_dir, pretrained_card(Path(out_dir).name, steps, steps * batch_size * seq_len,
                                        sum(tail) / len(tail) if tail else None))
    return {
        "steps": steps, "steps_this_run": steps - first, "student_tokens": steps * batch_size * seq_len,
        "teacher_tokens": 0, "final_loss": sum(tail) / len(tail) if tail else None,
        "first_loss": losses[0] if losses and first == 0 else None,
    }
