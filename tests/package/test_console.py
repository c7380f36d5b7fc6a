"""The console (cbd_ray.console): on a quiet console only the project's own worker lines and
Ray's notices pass, every worker line goes to the run's log file, -v keeps Ray's printer and
the libraries as they are, and a finished stage leaves one line. Pure CPU, milliseconds: the
real Ray path is checked by tests/cluster/test_local_head.py (the job's log of the smoke chain)."""
from __future__ import annotations

import logging

import pytest

from cbd_ray import console
from cbd_ray.pipeline import Stage, run_stages

#: one batch of worker lines as Ray hands them to the driver (from a demo console)
NOISE = [
    "Requesting resources: {'CPU': 1.0} * 1",
    "Failed to stop PlacementGroupCleaner gracefully.",
    "Traceback (most recent call last):",
    "[2026-12-06 08:56:48,343] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
    "Loading weights: 100%|██████████| 52/52 [00:00<00:00, 4431.20it/s]",
    "[dataset]: A new progress UI is available.",
    "[transformers] Token indices sequence length is longer than the specified maximum",
    "/work/main/cbd_ray/stages/models.py:188: UserWarning: Converting a tensor with requires_grad=True",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/runs/demo/work)",
]
OWN = [
    "[distill] step 20/60 loss=0.07269 eval_loss=0.07903 tok/s=8371",
    "pretrain: step 40/400 loss 4.724 (8,417 tokens/s)",
    "reproduce_tiny/cbd: finetune t-2x48: step 10/40 held-out loss 4.1",
]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def shown():
    """What the quiet console shows of the workers: the ``cbd_ray.workers`` log lines."""
    rec = Records()
    log = logging.getLogger(console.WORKER_LOGGER)
    log.addHandler(rec)
    log.setLevel(logging.INFO)
    yield rec.lines
    log.removeHandler(rec)
    log.setLevel(logging.NOTSET)


def test_a_quiet_console_shows_only_the_projects_worker_lines_and_the_log_file_gets_every_line(tmp_path, shown):
    lines = NOISE[:4] + OWN[:1] + NOISE[4:] + OWN[1:]
    with console.log_file(tmp_path / console.LOG_FILE) as path:
        console.WorkerLines(console=True)({"pid": 14965, "actor_name": "RayTrainWorker", "is_err": False,
                                            "lines": lines})
        console.WorkerLines(console=True)({"pid": "raylet", "lines": ["A worker died or was killed"]})
        console.WorkerLines(console=True)({"pid": "autoscaler", "lines": ["======== Autoscaler status ====="]})
    assert shown == OWN + ["(raylet) A worker died or was killed"]
    filed = path.read_text()
    assert all(f"(RayTrainWorker pid=14965) {line}" in filed for line in lines)
    assert "Autoscaler status" not in filed  # its 5-second status, as Ray's own printer drops it
    assert "(raylet) A worker died" in filed


def test_with_verbose_the_worker_lines_are_only_filed_not_shown(tmp_path, shown, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.log_file(tmp_path / "run.log") as path:
        console.WorkerLines(console=False)({"pid": 7, "task_name": "_ship_task", "lines": OWN[1:2]})
    assert shown == [] and f"(_ship_task pid=7) {OWN[1]}" in path.read_text()


class Dispatcher:
    """Ray's dispatcher of worker output, as far as the console uses it."""

    def __init__(self) -> None:
        self.handlers = [("ray_print_logs", print)]

    def add_handler(self, name, handler) -> None:
        self.handlers.append((name, handler))

    def remove_handler(self, name) -> None:
        self.handlers = [h for h in self.handlers if h[0] != name]


@pytest.mark.parametrize("verbose, names", [("0", [console.HANDLER_NAME]),
                                            ("1", ["ray_print_logs", console.HANDLER_NAME])])
def test_quiet_replaces_rays_printer_and_verbose_keeps_it(verbose, names, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, verbose)
    d = Dispatcher()
    assert console.route_worker_output(d) and console.route_worker_output(d)  # twice: installed once
    assert [n for n, _ in d.handlers] == names
    assert d.handlers[-1][1].console is (verbose == "0")
    console.unroute_worker_output(d)
    assert console.HANDLER_NAME not in [n for n, _ in d.handlers]


def test_quiet_quiets_the_libraries_and_verbose_gives_them_back(monkeypatch):
    for k in console.QUIET_ENV:
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)  # absent now, restored after the test
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.setattr(console, "_set_env", {})
    warning = logging.makeLogRecord({"name": "DeepSpeed", "levelno": logging.WARNING, "msg": "Setting accelerator"})
    console.configure(0)
    assert {k: console.os.environ.get(k) for k in console.QUIET_ENV} == console.QUIET_ENV
    assert console.ray_init_options() == {"logging_level": logging.WARNING}
    assert not logging.getLogger("DeepSpeed").filter(warning)
    console.configure(1)
    assert not any(k in console.os.environ for k in console.QUIET_ENV)
    assert console.ray_init_options() == {} and logging.getLogger("DeepSpeed").filter(warning)


def test_distill_progress_is_a_fifth_of_the_run_unless_verbose_or_set(monkeypatch):
    from cbd_ray.train import DistillConfig

    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert DistillConfig(steps=60).log_interval == 12 and DistillConfig(steps=3).log_interval == 1
    assert DistillConfig(steps=60, log_every=7).log_interval == 7 and DistillConfig(log_every=0).log_interval == 0
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert DistillConfig(steps=60).log_interval == 1


def test_a_finished_stage_leaves_one_line_with_its_time_key_metric_and_output(tmp_path):
    def fn(ctx):
        ctx.out.mkdir(parents=True)
        return {"student_tokens": 5, "loss": 2.0, "eval_loss": 0.03384, "targets": 3}

    said: list[str] = []
    run_stages([Stage("chain_1", fn, output="models/a1"), Stage("report", lambda ctx: {})], tmp_path, log=said.append)
    done = [s for s in said if " done in " in s]
    assert len(done) == 2 and done[0].startswith("[chain_1] done in ")
    assert done[0].endswith(", eval loss 0.03384 -> models/a1") and done[1].endswith("s -> stages/report")
