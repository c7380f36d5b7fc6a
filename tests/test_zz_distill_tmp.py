import pytest
from cbd_ray.train import DistillConfig, run_distill
from distill_models import DOLLY_EVAL, DOLLY_TRAIN, make_pair

def test_tmp(ray_clean, tokenizer, shared_data, tmp_path):
    teacher, student = make_pair(tmp_path / "pair", tokenizer)
    for obj in ("minillm", "on_policy"):
        cfg = DistillConfig(objective=obj, steps=3, batch_size=4, micro_batch=1, max_len=64, lr=3e-3, checkpoint_every=3,
                            eval_limit=4, data_limit=16, device="cpu", workers=2, ppo_epochs=2, max_new_tokens=8, on_policy_fraction=0.5)
        m = run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / f"out_{obj}", cfg,
                        eval_data=shared_data / DOLLY_EVAL, storage_path=tmp_path / f"ray_{obj}")
        print("RESULT", obj, {k: v for k, v in m.items() if k != "checkpoints"})
