"""Tiny teacher/student pairs for the distillation tests (a 512-token BPE vocabulary).

The teacher gets a large initialiser range so its next-token distributions are far from
uniform: a student that matches them has to learn something."""
from __future__ import annotations

from pathlib import Path

DOLLY_TRAIN = "dolly/dolly_train_1k.jsonl"
DOLLY_EVAL = "dolly/dolly_eval.jsonl"


def make_pair(root: Path, tokenizer) -> tuple[Path, Path]:
    from cbd_ray.tiny import save_tiny_model

    teacher = save_tiny_model(root / "teacher", "gpt2", tokenizer, seed=1, layers=2, hidden=64, heads=4,
                              max_positions=128, initializer_range=0.2)
    student = save_tiny_model(root / "student", "gpt2", tokenizer, seed=2, layers=2, hidden=32, heads=2,
                              max_positions=128)
    return teacher, student
