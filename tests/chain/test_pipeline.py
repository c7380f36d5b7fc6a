"""Stages over a manifest, on fake stage functions (no models, no Ray): skip what is intact,
resume a cut-short stage from its work directory, redo a stage whose config, input or
output changed, --from-stage and --force, failures recorded without touching earlier outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbd_ray.manifest import Manifest
from cbd_ray.pipeline import Stage, StageContext, StageFailed, run_stages
from cbd_ray.stages.summary import cost_rows, format_cost_table, savings

from conftest import ROOT


class Fake:
    """Three stages a -> b -> c. Each writes ``value.txt`` = its config value plus its
    input's value; ``b`` counts steps in its work dir and can be told to fail at a step."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_b_at: int | None = None
        self.cfg = {"a": 1, "b": 2, "c": 3}

    def fn(self, name: str):
        def run(ctx: StageContext) -> dict:
            self.calls.append(name)
            ctx.out.mkdir(parents=True)
            upstream = sum(int((p / "value.txt").read_text()) for p in ctx.inputs.values())
            if name == "b":  # a "training" stage: 4 steps, a checkpoint after each
                ckpt = ctx.work / "step"
                step = int(ckpt.read_text()) if ckpt.exists() else 0
                assert ctx.resume == (step > 0)
                while step < 4:
                    step += 1
                    ckpt.write_text(str(step))
                    if self.fail_b_at == step:
                        raise RuntimeError(f"worker died at step {step}")
            (ctx.out / "value.txt").write_text(str(ctx.config["v"] + upstream))
            return {"student_tokens": 10, "teacher_tokens": 100 if name != "a" else 0}
        return run

    def stages(self) -> list[Stage]:
        return [
            Stage("a", self.fn("a"), config={"v": self.cfg["a"]}),
            Stage("b", self.fn("b"), config={"v": self.cfg["b"]}, inputs=["a"], teacher="a"),
            Stage("chain_1", self.fn("chain_1"), config={"v": self.cfg["c"]}, inputs=["b"], teacher="b"),
        ]


def run(fake: Fake, run_dir: Path, **kw) -> Manifest:
    return run_stages(fake.stages(), run_dir, log=lambda s: None, **kw)


def value(run_dir: Path, stage: str) -> int:
    return int((run_dir / "stages" / stage / "value.txt").read_text())


def test_first_run_records_everything_and_rerun_skips(tmp_path):
    f = Fake()
    m = run(f, tmp_path)
    assert f.calls == ["a", "b", "chain_1"]
    assert value(tmp_path, "chain_1") == 3 + 2 + 1
    rec = m.get("b")
    assert rec["status"] == "done" and rec["inputs"]["a"] == m.get("a")["outputs"]["digest"]
    assert rec["outputs"]["checksums"]["value.txt"] and rec["teacher_tokens"] == 100 and rec["wall_s"] >= 0
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["stages"]["chain_1"]["status"] == "done"
    before = {n: r["finished"] for n, r in on_disk["stages"].items()}
    f.calls.clear()
    m2 = run(f, tmp_path)
    assert f.calls == []
    assert {n: r["finished"] for n, r in m2.stages.items()} == before


def test_changed_config_redoes_the_stage_and_what_depends_on_it(tmp_path):
    f = Fake()
    run(f, tmp_path)
    f.calls.clear()
    f.cfg["b"] = 20
    run(f, tmp_path)
    assert f.calls == ["b", "chain_1"]
    assert value(tmp_path, "chain_1") == 3 + 20 + 1


def test_corrupted_output_is_detected_and_rebuilt_downstream_kept(tmp_path):
    f = Fake()
    m = run(f, tmp_path)
    finished_c = m.get("chain_1")["finished"]
    (tmp_path / "stages" / "b" / "value.txt").write_text("999")
    f.calls.clear()
    m = run(f, tmp_path)
    assert f.calls == ["b"]  # rebuilt with the same content: chain_1's input digest is unchanged
    assert value(tmp_path, "b") == 3 and m.get("chain_1")["finished"] == finished_c
    assert m.get("b")["attempts"] == 2 and (tmp_path / "work" / "b" / "step").read_text() == "4"


def test_failed_stage_is_recorded_and_earlier_outputs_kept_then_resumed(tmp_path):
    f = Fake()
    f.fail_b_at = 3
    with pytest.raises(StageFailed, match="worker died at step 3") as exc:
        run(f, tmp_path)
    assert exc.value.stage == "b"
    m = Manifest.load(tmp_path)
    assert m.get("b")["status"] == "failed" and "RuntimeError: worker died at step 3" in m.get("b")["error"]
    assert m.get("a")["status"] == "done" and value(tmp_path, "a") == 1
    assert not (tmp_path / "stages" / "b").exists()  # no half-written output that looks whole
    assert (tmp_path / "work" / "b" / "step").read_text() == "3"
    f.fail_b_at = None
    f.calls.clear()
    m = run(f, tmp_path)
    assert f.calls == ["b", "chain_1"] and m.get("b")["attempts"] == 2
    assert value(tmp_path, "chain_1") == 6


def test_kill_after_a_stage_then_rerun_continues_without_redoing_it(tmp_path):
    f = Fake()

    def kill_after_b(name: str, rec: dict) -> None:
        if name == "b":
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(f, tmp_path, after_stage=kill_after_b)
    m = Manifest.load(tmp_path)
    assert m.get("b")["status"] == "done" and m.get("chain_1") is None
    done_b = m.get("b")["finished"]
    f.calls.clear()
    m = run(f, tmp_path)
    assert f.calls == ["chain_1"] and m.get("b")["finished"] == done_b
    assert m.get("chain_1")["started"] > done_b


def test_from_stage_and_force(tmp_path):
    f = Fake()
    run(f, tmp_path)
    f.calls.clear()
    run(f, tmp_path, from_stage="b")
    assert f.calls == ["b", "chain_1"]
    f.calls.clear()
    run(f, tmp_path, force=True)
    assert f.calls == ["a", "b", "chain_1"]
    with pytest.raises(ValueError, match="not a stage of this run; stages: a, b, chain_1"):
        run(f, tmp_path, from_stage="nope")


def test_changed_config_does_not_resume_old_checkpoints(tmp_path):
    f = Fake()
    f.fail_b_at = 2
    with pytest.raises(StageFailed):
        run(f, tmp_path)
    f.fail_b_at = None
    f.cfg["b"] = 5  # the Fake asserts ctx.resume is False exactly when no step is on disk
    run(f, tmp_path)
    assert (tmp_path / "work" / "b" / "step").read_text() == "4"
    assert value(tmp_path, "b") == 6


def test_teacher_cost_table(tmp_path):
    f = Fake()
    m = run(f, tmp_path)
    rows = cost_rows(m, n_targets=5)
    by = {r["stage"]: r for r in rows}
    assert by["chain total"]["teacher_tokens"] == 200
    direct = next(r for r in rows if r["stage"].startswith("direct:"))
    assert direct["teacher_tokens"] == 5 * 100  # N targets x the first chain step's budget
    assert savings(rows) == pytest.approx(500 / 200)
    text = format_cost_table(rows)
    assert "chain total" in text and "2.50x" in text


def test_an_identical_rebuild_with_other_timings_does_not_cascade(tmp_path):
    """The digest later stages key on covers the output files, not the run's timings and
    metrics (stage.json, distill.json, cards), which differ on every rebuild."""
    import time

    f = Fake()
    base = f.fn

    def timed(name):
        inner = base(name)

        def run_(ctx):
            m = inner(ctx)
            (ctx.out / "distill.json").write_text(json.dumps({"wall_s": time.perf_counter()}))
            return {**m, "wall_s": time.perf_counter()}
        return run_

    f.fn = timed
    m = run(f, tmp_path)
    finished_c = m.get("chain_1")["finished"]
    (tmp_path / "stages" / "a" / "value.txt").write_text("7")  # a corrupted input model
    f.calls.clear()
    m = run(f, tmp_path)
    assert f.calls == ["a"] and m.get("chain_1")["finished"] == finished_c


def test_a_foreign_folder_is_never_adopted_as_a_run_directory(tmp_path):
    from cbd_ray.pipeline import RunDirConflict
    from cbd_ray.schema import load_config
    from cbd_ray.stages.chain import run_chain

    mine = tmp_path / "smoke" / "models"
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    for force in (False, True):
        with pytest.raises(RunDirConflict, match="not a cbd-ray run"):
            run_chain(cfg, storage=str(tmp_path), force=force, log=lambda s: None)
    assert (mine / "thesis.txt").read_text() == "years of work" and sorted(p.name for p in mine.parent.iterdir()) == ["models"]


def test_the_driver_plans_devices_from_the_cluster_without_an_accelerator():
    from cbd_ray import devices
    from cbd_ray.errors import CBDError

    assert devices.plan("auto", {"CPU": 8})[0].kind == "cpu"
    spec, why = devices.plan("auto", {"CPU": 8, "NPU": 16})
    assert spec.kind == "npu" and spec.ray_resource == "NPU" and "NPU=16" in why
    assert devices.plan("cuda", {"CPU": 0, "GPU": 2})[0].backend == "nccl"
    with pytest.raises(CBDError, match=r"scaling.device=npu needs the Ray resource 'NPU' but the cluster has CPU=4, GPU=1"):
        devices.plan("npu", {"CPU": 4, "GPU": 1})
    with pytest.raises(ValueError, match="'tpu' is not one of"):
        devices.plan("tpu", {})
