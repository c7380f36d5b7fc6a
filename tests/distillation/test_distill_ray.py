"""The engine on a local Ray (2 CPUs): Ray Data tokenisation with an actor pool (and, for a few
records, the same table made in the driver), a 2-worker
run that crashes once and resumes from its checkpoint and matches a 1-worker run with the
same global batch, and a clear error when the cluster is too small."""
from __future__ import annotations

import pytest

from cbd_ray.data import encode_records, instruction_dataset, read_instructions, rows_from_arrays, tokenize_dataset
from cbd_ray.errors import CBDError
from cbd_ray.train import DistillConfig, run_distill

from distill_models import DOLLY_EVAL, DOLLY_TRAIN, make_pair

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    return make_pair(tmp_path_factory.mktemp("pair"), tokenizer)


def test_ray_data_tokenises_like_the_plain_function(ray_clean, pair, shared_data, tokenizer):
    path = shared_data / DOLLY_EVAL
    ds = instruction_dataset(path, limit=24)
    plain = encode_records(tokenizer, read_instructions(path, 24), 64)
    got = []
    for b in tokenize_dataset(ds, str(pair[1]), 64, actors=2, batch_size=8).iter_batches(batch_size=None, batch_format="numpy"):
        got.extend(rows_from_arrays(b))
    key = lambda r: tuple(r["input_ids"])  # noqa: E731
    assert sorted(got, key=key) == sorted(plain, key=key)
    assert sum(r["truncated"] for r in got) == sum(r["truncated"] for r in plain) > 0


def test_few_records_are_tokenised_in_the_driver_into_the_table_the_actors_give(ray_clean, pair, shared_data):
    """data_actors: auto below DRIVER_TOKENISE_RECORDS: the same Arrow table, type for type."""
    import ray

    from cbd_ray.data import tokenize_in_process
    from cbd_ray.train import records_table

    items = [{**r, "idx": i} for i, r in enumerate(read_instructions(shared_data / DOLLY_EVAL, 30))]
    actors = records_table(tokenize_dataset(ray.data.from_items(items), str(pair[1]), 64, actors=1,
                                            batch_size=8).materialize())
    driver = tokenize_in_process(items, str(pair[1]), 64, batch_size=7)
    assert driver.schema == actors.schema and driver.equals(actors)
    assert driver["idx"].to_pylist() == list(range(30))


def test_each_worker_reads_only_its_own_shard(ray_clean):
    """Two workers get disjoint shards that together cover every record, the same on every
    attempt (the resume's determinism rests on it)."""
    import ray

    from cbd_ray.train import shard_datasets

    ds = ray.data.from_items([{"idx": i} for i in range(37)]).materialize()

    def shards():
        parts = shard_datasets(ds, 2)
        return [sorted(int(i) for b in parts[f"data_{r}"].iter_batches(batch_format="numpy") for i in b["idx"])
                for r in range(2)]

    first = shards()
    assert not set(first[0]) & set(first[1]) and len(first[0]) + len(first[1]) >= 36  # equal=True may drop 1
    assert abs(len(first[0]) - len(first[1])) <= 1 and shards() == first


def test_two_workers_resume_after_a_crash_bit_identically(ray_clean, pair, shared_data, tmp_path):
    """A 2-worker run that crashes at step 2 and is restarted by FailureConfig from its
    step-2 checkpoint reports the same loss at every step as an uninterrupted run, and says
    it took one restart."""
    teacher, student = pair
    cfg = DistillConfig(objective="kd", divergence="fkl", steps=4, batch_size=4, micro_batch=2, max_len=64,
                        lr=3e-3, checkpoint_every=1, eval_limit=8, data_limit=40, device="cpu", workers=2,
                        fail_at_step=2, select_best_by="loss", log_every=1, data_actors=1)
    m = run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "out", cfg,
                    eval_data=shared_data / DOLLY_EVAL, storage_path=tmp_path / "ray", max_failures=1)
    assert list((tmp_path / "ray").glob("distill-*/injected_failure"))  # the first attempt did crash
    assert m["restarts"] == 1
    # resumed from the step-2 checkpoint: every step was reported exactly once
    assert [c["step"] for c in m["checkpoints"]] == [1, 2, 3, 4]
    assert m["step"] == 4 and m["teacher_tokens"] > 0
    best = min(m["checkpoints"], key=lambda c: c["eval_loss"])
    assert m["selected_step"] == best["step"] and m["selected_eval_loss"] == best["eval_loss"]

    # the uninterrupted run tokenises its 40 records in the driver (data_actors: auto), the
    # crashed one with a Ray Data actor: the same rows, so the same loss at every step
    clean = run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "clean", cfg.model_copy(
        update={"fail_at_step": None, "data_actors": "auto"}), eval_data=shared_data / DOLLY_EVAL,
        storage_path=tmp_path / "ray2")
    assert clean["restarts"] == 0
    assert [c["loss"] for c in m["checkpoints"]] == [c["loss"] for c in clean["checkpoints"]]
    assert m["student_tokens"] == clean["student_tokens"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_embd == 32 and len(AutoTokenizer.from_pretrained(out)) == 512
    assert (out / "distill.json").is_file() and not list(tmp_path.glob(".out.tmp-*"))


def test_changed_settings_never_resume_older_checkpoints(pair, shared_data):
    """The Ray Train run name carries a hash of the settings and the inputs' contents."""
    from cbd_ray.train import run_key

    cfg = DistillConfig(objective="kd", steps=3, batch_size=2, max_len=48, device="cpu", workers=1)
    data = shared_data / DOLLY_TRAIN
    k = run_key(cfg, pair[0], pair[1], data, None, None)
    assert k == run_key(cfg.model_copy(update={"log_every": 7, "fail_at_step": 2}), pair[0], pair[1], data, None, None)
    assert k != run_key(cfg.model_copy(update={"lr": 1e-4}), pair[0], pair[1], data, None, None)
    assert k != run_key(cfg, pair[1], pair[1], data, None, None)


def test_more_workers_than_the_cluster_holds_is_a_clear_error(ray_clean, pair, shared_data, tmp_path):
    cfg = DistillConfig(objective="kd", steps=1, batch_size=4, max_len=64, device="cpu", workers=4, data_limit=8)
    with pytest.raises(CBDError, match=r"4 workers need CPU=4 but the Ray cluster has CPU=2"):
        run_distill(pair[0], pair[1], shared_data / DOLLY_TRAIN, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_a_rerun_of_a_killed_driver_resumes_from_the_last_checkpoint(ray_clean, pair, shared_data, tmp_path):
    """No FailureConfig retry: the first driver dies at step 2; running it again with the same
    storage continues from the step-2 checkpoint instead of starting over."""
    import ray.train

    teacher, student = pair
    cfg = DistillConfig(objective="sft", steps=3, batch_size=2, max_len=48, lr=3e-3, checkpoint_every=1,
                        data_limit=16, device="cpu", workers=1, fail_at_step=2, log_every=1)
    args = (teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "out", cfg)
    with pytest.raises((ray.train.WorkerGroupError, RuntimeError)):
        run_distill(*args, storage_path=tmp_path / "ray", max_failures=0)
    assert not (tmp_path / "out").exists()  # nothing that looks whole was written
    m = run_distill(*args, storage_path=tmp_path / "ray", max_failures=0)
    assert [c["step"] for c in m["checkpoints"]] == [1, 2, 3]
    assert m["step"] == 3 and (tmp_path / "out" / "model.safetensors").is_file()


def test_minillm_streams_its_pretraining_text_from_one_tokenised_corpus(ray_clean, pair, shared_data, tmp_path,
                                                                       tokenizer):
    """The pretraining text is tokenised once into the storage's corpora/ by Ray Data; two
    workers stream their own blocks from it, and the next request for the same text,
    tokenizer and length reuses it instead of tokenising again."""
    from cbd_ray.tiny import builtin_text

    text = tmp_path / "pretrain.txt"
    text.write_text(builtin_text()[:60_000])
    teacher, student = pair
    cfg = DistillConfig(objective="minillm", steps=2, batch_size=4, micro_batch=1, max_len=64, lr=1e-3,
                        checkpoint_every=2, data_limit=16, device="cpu", workers=2, max_new_tokens=8, ppo_epochs=2,
                        lm_data=str(text), log_every=1)
    said: list[str] = []
    m = run_distill(teacher, student, shared_data / DOLLY_TRAIN, tmp_path / "out", cfg, storage_path=tmp_path / "ray",
                    log=said.append)
    corpora = list((tmp_path / "ray" / "corpora").iterdir())
    assert len(corpora) == 1 and (corpora[0] / "index.json").is_file()
    assert m["loss_lm_ce"] > 0 and m["step"] == 2
    # the recipe drops the prompts over 256 tokens (Ray Data marks them, the driver counts them)
    from cbd_ray.data import render_prompt

    long = sum(len(tokenizer(render_prompt(r["instruction"], r["context"]), add_special_tokens=False)["input_ids"])
               > 256 for r in read_instructions(shared_data / DOLLY_TRAIN, 16))
    assert long > 0 and m["dropped_prompts"] == long and m["stopped_by"] == "steps"
    assert any(f"dropped {long} of 16 records" in s for s in said)
    # what the next chain step or a rerun asks for: the same text, tokenizer and length
    from cbd_ray.train import lm_corpus

    again = lm_corpus(cfg, None, student, str(tmp_path / "ray" / "corpora"), say=said.append)
    assert "[corpus] reusing" in said[-1] and again["uri"] == str(corpora[0])
    assert len(list((tmp_path / "ray" / "corpora").iterdir())) == 1
