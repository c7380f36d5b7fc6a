"""Where a stage's work runs: one Ray task on one worker's resources, decided on the driver.

:func:`accel` picks the device kind and Ray options of a single-model task from the cluster's
resources; :func:`produce` runs a function that writes a directory as such a task (or
in-process without Ray) and makes that directory the stage's output, shipping it through
storage when the run directory is remote; :func:`model_ref` is what a worker is given for a
model input (a storage reference, never a driver path).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cbd_ray.pipeline import StageContext
from cbd_ray.schema import ChainConfig
from cbd_ray.stages.models import model_dir_of


def accel(cfg: ChainConfig) -> tuple[str, dict[str, Any]]:
    """(device kind, Ray task options) of a single-model task, decided from the cluster's
    resources on the driver (which needs no accelerator): ``auto`` takes what the cluster
    has; ``cuda``/``npu`` on a cluster without it is refused before any work."""
    import ray

    from cbd_ray import devices

    if not ray.is_initialized():
        kind = "cpu" if cfg.scaling.device in ("auto", "cpu") else cfg.scaling.device
        return kind, {}
    spec, _ = devices.plan(cfg.scaling.device, ray.cluster_resources())
    opts: dict[str, Any] = {"num_cpus": cfg.scaling.cpus_per_worker}
    if spec.kind == "cuda":
        opts["num_gpus"] = 1
    elif spec.kind == "npu":
        opts["resources"] = {"NPU": 1}
    return spec.kind, opts


def produce(cfg: ChainConfig, ctx: StageContext, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(out_dir, device, *args)`` as one Ray task on one worker's resources (a CPU
    slot, a GPU or an NPU), or in-process without Ray; the directory it writes becomes the
    stage's output. With a remote run directory the worker writes a local directory of its
    own and uploads it to ``work/<stage>/shipped``, from where the driver fetches it: the
    worker never sees a driver path."""
    import ray

    kind, opts = accel(cfg)
    if not ray.is_initialized():
        return fn(str(ctx.out), kind, *args)
    task = ray.remote(_ship_task).options(max_retries=0, **opts)
    ship = ctx.uri("work", ctx.name, "shipped") if ctx.remote else None
    out = None if ctx.remote else str(ctx.out)
    metrics = ray.get(task.remote(fn, out, ship, kind, *args))
    if ship is not None:
        from cbd_ray.storage import delete_dir, download_dir

        download_dir(ship, ctx.out)
        delete_dir(ship)
    return metrics


def _ship_task(fn: Callable[..., Any], out: str | None, ship: str | None, kind: str, *args: Any) -> Any:
    """The worker side of :func:`produce`."""
    import shutil
    import tempfile

    from cbd_ray.storage import delete_dir, upload_dir

    if ship is None:
        return fn(out, kind, *args)
    tmp = Path(tempfile.mkdtemp(prefix="cbd_produce_"))
    try:
        metrics = fn(str(tmp / "out"), kind, *args)
        delete_dir(ship)
        upload_dir(tmp / "out", ship)
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_ref(ctx: StageContext, name: str) -> Any:
    """What a worker gets for the model input ``name``: a storage reference to the stage's
    directory when it holds the model, else the reference it recorded (a hub name, or a
    directory that must then be shared)."""
    if (ctx.inputs[name] / "config.json").is_file():
        return ctx.ref(name)
    return model_dir_of(ctx.inputs[name])
