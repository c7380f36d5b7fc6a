"""A grid of interpolated targets made in parallel by a pool of Ray actors.

A grid is a list of target shapes between two anchors: given one by one (a YAML list) or
as a parameter-count range that :func:`shapes_for_params` turns into shapes. The whole
grid is validated against the anchors before any work starts, then a pool of
:class:`InterpolationActor` (each holding the anchor pair once) makes the targets;
:func:`run_grid` prints one line per finished target, writes ``grid.json`` and returns
the records in grid order (and ``grid.png``, targets by parameters and α). One failing
target is recorded with its error; the others go on.

Grid YAML::

    alpha: auto                 # default α for targets without their own (number in [0, 1] or auto)
    resize: {layer_subset: uniform}   # optional ResizeOptions fields
    targets:                    # explicit shapes ...
      - {name: mid, layers: 3, hidden: 96, heads: 6, alpha: 0.5}
    params: {min: 2.0e6, max: 3.0e6, count: 3}   # ... and/or a parameter-count range

A parameter range becomes shapes deterministically (:func:`search_shape`): every
(layers, hidden) between the anchors, hidden in steps of their head_dim, heads = hidden /
head_dim, FFN at the anchors' FFN/hidden ratio; among the shapes within 2% of the wanted
count, the one whose depth and width have grown most evenly from the smaller anchor wins.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal, Sequence, Union

import ray
from pydantic import Field, PositiveInt, model_validator

from cbd_ray.config import Strict, apply_overrides, build, load_yaml
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.session import connect_ray
from cbd_ray.storage import atomic_directory, atomic_write_json, driver_path, ref_label, uri_join, worker_ref

logger = logging.getLogger(__name__)

Alpha = Union[float, Literal["auto"], list[float]]  # a number in [0, 1], auto, or one per target layer
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: relative parameter-count error accepted before the search prefers balanced depth/width
PARAMS_TOLERANCE = 0.02


# --------------------------------------------------------------------------- the grid file


class TargetEntry(Strict):
    """One explicit target of a grid file."""

    name: str | None = None
    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt | None = None
    ffn: PositiveInt | None = None
    alpha: Alpha | None = None


class ParamsRange(Strict):
    """``count`` targets whose parameter counts are evenly spaced from ``min`` to ``max``
    (both included; ``count: 1`` takes ``min``). Omitted ends default to the anchors' counts."""

    min: float | None = Field(default=None, gt=0)
    max: float | None = Field(default=None, gt=0)
    count: int = Field(ge=1, le=1000)
    tolerance: float = Field(default=PARAMS_TOLERANCE, gt=0, lt=1)


class GridSpec(Strict):
    """A grid file: explicit targets and/or a parameter-count range."""

    alpha: Alpha = "auto"
    resize: dict[str, Any] | None = None
    targets: list[TargetEntry] = []
    params: ParamsRange | None = None
    export: list[Literal["onnx", "gguf"]] = []  # edge formats of every target (cbd_ray.export)

    @model_validator(mode="after")
    def _some_targets(self) -> "GridSpec":
        if not self.targets and self.params is None:
            raise ValueError("a grid needs `targets` (a list of shapes) or `params` (a parameter-count range)")
        return self


def load_grid(path: str | os.PathLike, overrides: list[str] | None = None) -> GridSpec:
    """Read a grid YAML file (unknown keys are errors naming their dotted path); dotted
    overrides (``params.count=5``) apply first."""
    return build(GridSpec, apply_overrides(load_yaml(path), overrides), source=str(path))


def parse_grid(data: dict | GridSpec) -> GridSpec:
    """A grid from an already-loaded mapping (e.g. a section of a larger config)."""
    return data if isinstance(data, GridSpec) else build(GridSpec, data, source="grid")


def resize_options(spec: GridSpec) -> Any:
    """The grid's ``resize`` mapping as ``ResizeOptions`` (None when not given)."""
    if spec.resize is None:
        return None
    from cbd_ray.interpolate import ResizeOptions

    allowed = [f.name for f in dataclasses.fields(ResizeOptions)]
    unknown = sorted(set(spec.resize) - set(allowed))
    if unknown:
        raise ConfigError(f"grid resize: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return ResizeOptions(**spec.resize).resolved()  # bad values fail here, before any work


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class GridTarget:
    """One target of a grid: its output name, its shape and its α (None = the grid default)."""

    name: str
    shape: Any  # cbd_ray.interpolate.Shape
    alpha: Alpha | None = None


def shape_label(shape: Any) -> str:
    """``layers x hidden x heads`` plus ``/kv`` and ``ffn`` when they are set."""
    s = f"{shape.layers}x{shape.hidden}x{shape.heads}"
    if getattr(shape, "kv_heads", None) and shape.kv_heads != shape.heads:
        s += f"/{shape.kv_heads}kv"
    if getattr(shape, "ffn", None):
        s += f" ffn{shape.ffn}"
    return s


def human_count(n: float) -> str:
    """1.234e8 -> '123.4M', 2.5e6 -> '2.50M', 48000 -> '48.0k'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.2f}{unit}" if v < 10 else f"{v:.1f}{unit}"
    return str(int(n))


def _frac(v: float, a: float, b: float) -> float:
    """Where v lies between a and b (0 at a, 1 at b; 0 when the anchors agree)."""
    return 0.0 if a == b else (v - a) / (b - a)


def _nearest_divisor(n: int, want: float) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - want), d))


def _candidate(layers: int, hidden: int, small: Any, large: Any) -> Any:
    """The full shape for (layers, hidden): heads keep the anchors' head_dim, FFN keeps
    their FFN/hidden ratio, kv_heads keep their group size (interpolated where the anchors differ)."""
    t = _frac(hidden, small.hidden, large.hidden)
    hd_s, hd_l = small.hidden // small.heads, large.hidden // large.heads
    if hd_s == hd_l:
        heads = hidden // hd_s
    else:
        heads = _nearest_divisor(hidden, small.heads + t * (large.heads - small.heads))
    kv = None
    if small.kv_heads is not None or large.kv_heads is not None:
        kv_s, kv_l = small.kv_heads or small.heads, large.kv_heads or large.heads
        g_s, g_l = small.heads / kv_s, large.heads / kv_l
        if g_s == g_l and heads % int(g_s) == 0:
            kv = heads // int(g_s)
        else:
            kv = _nearest_divisor(heads, kv_s + t * (kv_l - kv_s))
    ffn = None
    if small.ffn is not None or large.ffn is not None:
        f_s, f_l = small.ffn or 4 * small.hidden, large.ffn or 4 * large.hidden
        r_s, r_l = f_s / small.hidden, f_l / large.hidden
        if r_s == r_l and (r_s * hidden).is_integer():
            ffn = int(r_s * hidden)
        else:
            m = math.gcd(f_s, f_l)
            ffn = max(m, round((r_s + t * (r_l - r_s)) * hidden / m) * m)
            ffn = min(max(ffn, min(f_s, f_l)), max(f_s, f_l))
    return type(small)(layers=layers, hidden=hidden, heads=heads, kv_heads=kv, ffn=ffn)


def candidate_shapes(small: Any, large: Any) -> list[Any]:
    """Every shape the parameter search may pick: layers from the smaller to the larger
    anchor's count, hidden in steps of the anchors' head_dim (of gcd of the two head_dims
    when they differ) between the two anchors' hidden sizes; heads, kv_heads and ffn follow
    (:func:`_candidate`) and must stay between the anchors' values, and the GQA group size
    is kept where the anchors share one."""
    hd_s, hd_l = small.hidden // small.heads, large.hidden // large.heads
    step = hd_s if hd_s == hd_l else math.gcd(hd_s, hd_l)
    lo_h, hi_h = sorted((small.hidden, large.hidden))
    lo_l, hi_l = sorted((small.layers, large.layers))
    hiddens = list(range(math.ceil(lo_h / step) * step, hi_h + 1, step)) or [lo_h]
    out = []
    for h in hiddens:
        s = _candidate(lo_l, h, small, large)
        if s.kv_heads is not None and small.kv_heads and large.kv_heads:
            g_s, g_l = small.heads // small.kv_heads, large.heads // large.kv_heads
            if g_s == g_l and s.heads != s.kv_heads * g_s:
                continue  # keep the anchors' GQA group size where they share one
        if all(_between(getattr(s, ax), getattr(small, ax), getattr(large, ax)) for ax in ("heads", "kv_heads", "ffn")):
            out += [dataclasses.replace(s, layers=n) for n in range(lo_l, hi_l + 1)]
    return sorted(out, key=lambda s: (s.layers, s.hidden))


def _between(v: int | None, a: int | None, b: int | None) -> bool:
    return v is None or a is None or b is None or min(a, b) <= v <= max(a, b)


def search_shape(
    target_params: float,
    small: Any,
    large: Any,
    params_of: Callable[[Any], int],
    tolerance: float = PARAMS_TOLERANCE,
    accept: Callable[[Any], bool] | None = None,
) -> Any:
    """The shape between the anchors whose parameter count best fits ``target_params``.

    Deterministic: among all :func:`candidate_shapes` whose count is within ``tolerance``
    (relative) of the target, take the one whose depth and width have grown most evenly
    from the smaller anchor towards the larger (smallest |t_layers − t_hidden|, each t the
    fraction of the way from the smaller to the larger anchor's value); ties go to the
    smaller error, then fewer layers. When no candidate is within tolerance the smallest
    error wins. The paper's 138M target between GPT-2 small and medium comes out as its
    14 layers x 768. ``accept`` (e.g. "the anchors accept this target") filters candidates.
    """
    scored = []
    for shape in candidate_shapes(small, large):
        if accept is not None and not accept(shape):
            continue
        p = params_of(shape)
        err = abs(p - target_params) / target_params
        balance = abs(_frac(shape.layers, small.layers, large.layers) - _frac(shape.hidden, small.hidden, large.hidden))
        scored.append((err, balance, shape))
    if not scored:
        raise CBDError(f"no shape between {shape_label(small)} and {shape_label(large)} is accepted by the anchors")
    within = [s for s in scored if s[0] <= tolerance]
    if within:
        return min(within, key=lambda s: (round(s[1], 9), s[0], s[2].layers, s[2].hidden))[2]
    return min(scored, key=lambda s: (s[0], round(s[1], 9), s[2].layers, s[2].hidden))[2]


def shapes_for_params(
    prange: ParamsRange,
    small: Any,
    large: Any,
    params_of: Callable[[Any], int],
    accept: Callable[[Any], bool] | None = None,
) -> list[GridTarget]:
    """Targets for a parameter-count range: ``count`` evenly spaced counts, one shape each
    by :func:`search_shape`. Two counts that land on the same shape give one target. Named
    ``p<count>-<layers>x<hidden>`` (e.g. ``p138.4M-14x768``)."""
    p_small, p_large = params_of(small), params_of(large)
    lo_a, hi_a = sorted((p_small, p_large))
    lo = prange.min if prange.min is not None else lo_a
    hi = prange.max if prange.max is not None else hi_a
    if lo > hi:
        raise ConfigError(f"grid params: min={lo:g} is larger than max={hi:g}")
    for key, v in (("min", lo), ("max", hi)):
        if not lo_a <= v <= hi_a:
            raise ConfigError(
                f"grid params.{key}={v:g} is outside the anchors' range: small {shape_label(small)} has "
                f"{p_small:,} parameters, large {shape_label(large)} has {p_large:,}"
            )
    n = prange.count
    wanted = [lo] if n == 1 else [lo + i * (hi - lo) / (n - 1) for i in range(n)]
    out: list[GridTarget] = []
    seen = set()
    for p in wanted:
        shape = search_shape(p, small, large, params_of, prange.tolerance, accept)
        if shape in seen:
            continue
        seen.add(shape)
        out.append(GridTarget(f"p{human_count(params_of(shape))}-{shape.layers}x{shape.hidden}", shape))
    return out


def resolve_targets(spec: GridSpec, pair: Any) -> list[GridTarget]:
    """Explicit targets first, then the parameter range's, in file order."""
    from cbd_ray.interpolate import Shape

    out = [
        GridTarget(
            t.name or f"{t.layers}x{t.hidden}x{t.heads}",
            Shape(layers=t.layers, hidden=t.hidden, heads=t.heads, kv_heads=t.kv_heads, ffn=t.ffn),
            t.alpha,
        )
        for t in spec.targets
    ]
    if spec.params is not None:
        def accept(shape: Any) -> bool:
            try:
                pair.validate_target(shape, "auto")
                return True
            except ValueError:
                return False

        out += shapes_for_params(spec.params, pair.small_shape, pair.large_shape, pair.params_of, accept)
    return out


def as_targets(targets: Sequence[Any]) -> list[GridTarget]:
    """Accept GridTargets, Shapes, shape strings ("14x768x12") or dicts (with optional
    ``name`` and ``alpha``)."""
    from cbd_ray.interpolate import Shape, parse_shape

    out = []
    for t in targets:
        if isinstance(t, GridTarget):
            out.append(t)
        elif isinstance(t, Shape):
            out.append(GridTarget(f"{t.layers}x{t.hidden}x{t.heads}", t))
        elif isinstance(t, str):
            s = parse_shape(t)
            out.append(GridTarget(f"{s.layers}x{s.hidden}x{s.heads}", s))
        elif isinstance(t, dict):
            d = dict(t)
            name, alpha = d.pop("name", None), d.pop("alpha", None)
            s = parse_shape(d)
            out.append(GridTarget(name or f"{s.layers}x{s.hidden}x{s.heads}", s, alpha))
        else:
            raise CBDError(f"grid target {t!r} is not a GridTarget, Shape, shape string or mapping")
    return out


def validate_grid(
    pair: Any, targets: Sequence[GridTarget], out_root: str | os.PathLike, alpha: Alpha = "auto", overwrite: bool = False
) -> list[GridTarget]:
    """Check every target before any work: names usable as directory names and unique,
    shapes and α accepted by the anchors (``AnchorPair.validate_target``), no existing
    output without ``overwrite``. One error lists every bad target."""
    problems: list[str] = []
    if not targets:
        problems.append("the grid has no targets")
    seen: dict[str, int] = {}
    checked = []
    for i, t in enumerate(targets):
        where = f"target {i} ({t.name!r})"
        if not _NAME_OK.match(t.name) or len(t.name) > 100:
            problems.append(f"{where}: name must be 1-100 letters, digits, '.', '_', '+' or '-' (a directory name)")
        if t.name in seen:
            problems.append(f"{where}: name repeats target {seen[t.name]}")
        seen.setdefault(t.name, i)
        a = alpha if t.alpha is None else t.alpha
        try:
            shape = pair.validate_target(t.shape, a)
        except ValueError as exc:
            problems.append(f"{where} {shape_label(t.shape)}: {exc}")
            continue
        dest = Path(out_root) / t.name
        if not overwrite and not _may_reuse(dest, shape):
            problems.append(f"{where}: {dest} already exists and holds something else (pass overwrite to replace it)")
        checked.append(GridTarget(t.name, shape if shape is not None else t.shape, a))
    if problems:
        raise CBDError("bad grid:\n  " + "\n  ".join(problems))
    return checked


def _may_reuse(dest: Path, shape: Any) -> bool:
    """True when ``dest`` is absent, empty, or a model made for this same shape: making the
    same target again is a no-op in the engine (which compares anchors, α and resize too)."""
    if not dest.exists():
        return True
    if dest.is_dir() and not any(dest.iterdir()):
        return True
    try:
        import json

        made = json.loads((dest / "cbd.json").read_text())
    except (OSError, ValueError):
        return False
    return made.get("target") == dataclasses.asdict(shape)


# --------------------------------------------------------------------------- Ray


class Interpolator:
    """Holds one AnchorPair (anchors read and checked once) and makes many targets; the body
    of :data:`InterpolationActor`. Anchors are paths or storage references (fetched into
    this node's cache)."""

    def __init__(self, small_dir: Any, large_dir: Any, resize: Any = None) -> None:
        from cbd_ray.interpolate import AnchorPair
        from cbd_ray.storage import materialize

        self.pair = AnchorPair(str(materialize(small_dir)), str(materialize(large_dir)), resize=resize)

    def make(self, shape: Any, out_dir: str | None, alpha: Alpha = "auto", overwrite: bool = False,
             name: str | None = None, ship: str | None = None) -> dict:
        """One target: the engine's record (name, shape, params, alpha, seconds, path) and
        the host that made it. ``ship``: write into a local directory of this node and upload
        it to that storage URI (the driver's directory is not visible here)."""
        import shutil
        import socket
        import tempfile

        from cbd_ray.storage import delete_dir, upload_dir

        if ship is None:
            return {**self.pair.make(shape, out_dir, alpha=alpha, overwrite=overwrite, name=name),
                    "host": socket.gethostname()}
        tmp = Path(tempfile.mkdtemp(prefix="cbd_target_"))
        try:
            rec = self.pair.make(shape, str(tmp / "t"), alpha=alpha, overwrite=False, name=name)
            delete_dir(ship)
            upload_dir(tmp / "t", ship)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {**rec, "path": out_dir, "host": socket.gethostname()}


#: The Ray actor: ``InterpolationActor.options(num_cpus=N).remote(small_dir, large_dir, resize)``
#: (1 CPU unless told otherwise).
InterpolationActor = ray.remote(num_cpus=1)(Interpolator)


#: joining Ray follows one rule for every job (cbd_ray.session)
ensure_ray = connect_ray


def _fmt_s(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


@dataclass
class Limits:
    """Bounds that keep a grid from waiting forever: ``retries`` per target after its actor
    was lost (a lost node), ``target_timeout_s`` for one target, ``place_timeout_s`` for a
    replacement actor to find a node before the grid gives up on the targets left."""

    retries: int = 2
    target_timeout_s: float = 3600.0
    place_timeout_s: float = 120.0
    poll_s: float = 2.0


def _placeable(cpus: float) -> bool:
    """True when some alive node has ``cpus`` CPUs free for a new actor now."""
    try:
        avail = ray._private.state.state.available_resources_per_node()  # noqa: SLF001 - no public per-node view
    except Exception:  # noqa: BLE001 - fall back to the cluster total
        return ray.available_resources().get("CPU", 0) >= cpus
    return any(r.get("CPU", 0) >= cpus for r in avail.values())


def _alive_nodes() -> str:
    return ", ".join(f"{n['NodeManagerAddress']}(CPU={n['Resources'].get('CPU', 0):g})"
                     for n in ray.nodes() if n.get("Alive")) or "none"


def run_grid(
    small_dir: Any,
    large_dir: Any,
    targets: Sequence[Any] | GridSpec,
    out_root: str | os.PathLike,
    alpha: Alpha | None = None,
    resize: Any = None,
    num_actors: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    actor_cpus: float = 1,
    log: Callable[[str], None] | None = None,
    actor_class: Any = None,
    ship_uri: str | None = None,
    limits: Limits | None = None,
) -> list[dict]:
    """Make every target of a grid with a pool of ``num_actors`` interpolation actors.

    Targets: a GridSpec, or a list of GridTarget / Shape / "LxHxA" / mapping. ``alpha`` is
    the default for targets without their own (None: the GridSpec's, else "auto"); a
    GridSpec's ``resize`` applies unless ``resize`` is given. The grid is validated first
    (nothing runs when any target is bad). Each target goes to ``out_root/<name>``; one line per finished
    target shows elapsed time and ETA. Returns one record per target in grid order: the
    engine's record (name, shape, params, alpha, seconds, path) plus ``status`` "ok", or
    ``status`` "failed" with ``error``. ``out_root/grid.json`` gets all records.
    Anchors: local paths, or storage references (cbd_ray.storage.make_ref) the actors fetch.
    ``ship_uri``: actors write each target on their own node and upload it to
    ``ship_uri/<name>``, from where the driver fetches it into ``out_root`` (a run directory
    in object storage). A target whose actor is lost (a lost node) is retried on another
    actor; every wait is bounded (:class:`Limits`), and targets that cannot be placed fail
    with the reason instead of hanging.
    ``actor_class``: a Ray actor class with Interpolator's constructor and ``make`` (default
    :data:`InterpolationActor`), e.g. one doing extra set-up on each node.
    """
    from cbd_ray.interpolate import AnchorPair

    say = log or (lambda line: logger.info("%s", line))
    if not progress:
        say = lambda line: None  # noqa: E731
    if num_actors < 1:
        raise CBDError(f"num_actors={num_actors} must be at least 1")
    if isinstance(targets, GridSpec):
        resize = resize if resize is not None else resize_options(targets)
        alpha = targets.alpha if alpha is None else alpha
    alpha = "auto" if alpha is None else alpha
    pair = AnchorPair(str(driver_path(small_dir)), str(driver_path(large_dir)), resize=resize)  # checks the anchors before any actor
    grid = resolve_targets(targets, pair) if isinstance(targets, GridSpec) else as_targets(targets)
    grid = validate_grid(pair, grid, out_root, alpha, overwrite)
    out_root = Path(out_root).resolve()  # actors may run in another working directory
    out_root.mkdir(parents=True, exist_ok=True)

    started = ensure_ray()
    cls = actor_class or InterpolationActor
    args = (worker_ref(small_dir), worker_ref(large_dir), resize)
    pool = _Pool(lambda: cls.options(num_cpus=actor_cpus).remote(*args), actor_cpus, min(num_actors, len(grid)))
    t0 = time.perf_counter()
    say(f"grid: {len(grid)} targets on {len(pool.actors)} actors -> {out_root}")
    try:
        records = _drive(pool, grid, pair, out_root, overwrite, ship_uri, limits or Limits(), say)
    finally:
        pool.close()
        if started:
            ray.shutdown()
    failed = sum(r["status"] != "ok" for r in records)
    atomic_write_json(out_root / "grid.json", {
        "small": ref_label(worker_ref(small_dir)), "large": ref_label(worker_ref(large_dir)), "targets": len(records), "failed": failed,
        "records": records,
    })
    plot_grid(records, out_root / "grid.png", anchors=((pair.small_params, 1.0), (pair.large_params, 0.0)))
    say(f"grid: {len(records) - failed} ok, {failed} failed in {_fmt_s(time.perf_counter() - t0)}")
    return records


class _Pool:
    """The interpolation actors; a lost one is replaced only when a node can hold it."""

    def __init__(self, new: Callable[[], Any], cpus: float, n: int) -> None:
        self.new, self.cpus = new, cpus
        self.actors: list[Any] = [new() for _ in range(n)]

    def lose(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self.new() if _placeable(self.cpus) else None

    def revive(self) -> list[int]:
        """Give empty slots an actor where a node can hold one now; the slots filled."""
        filled = []
        for i, a in enumerate(self.actors):
            if a is None and _placeable(self.cpus):
                self.actors[i] = self.new()
                filled.append(i)
        return filled

    def idle(self, busy: set[int]) -> list[int]:
        return [i for i, a in enumerate(self.actors) if a is not None and i not in busy]

    def close(self) -> None:
        for a in self.actors:
            if a is not None:
                ray.kill(a, no_restart=True)


def _drive(pool: _Pool, grid: list[GridTarget], pair: Any, out_root: Path, overwrite: bool, ship_uri: str | None,
           lim: Limits, say: Callable[[str], None]) -> list[dict]:
    """Hand targets to idle actors until every target is ok or has failed for good."""
    records: list[dict | None] = [None] * len(grid)
    tries = [0] * len(grid)
    pending = list(range(len(grid)))
    running: dict[Any, tuple[int, int, float]] = {}  # ref -> (target, slot, start)
    t0, no_actor_since = time.perf_counter(), None
    while pending or running:
        for slot in pool.idle({s for _, s, _ in running.values()}):
            if not pending:
                break
            i = pending.pop(0)
            t, tries[i] = grid[i], tries[i] + 1
            ship = None if ship_uri is None else uri_join(ship_uri, t.name)
            extra = {"ship": ship} if ship else {}  # an actor_class may predate shipping
            ref = pool.actors[slot].make.remote(t.shape, str(out_root / t.name), t.alpha, overwrite, t.name, **extra)
            running[ref] = (i, slot, time.perf_counter())
        if pending:
            pool.revive()  # a node may have joined since an actor was lost
        if not running:  # targets left but no actor: wait (bounded) for a node that can hold one
            no_actor_since = no_actor_since or time.perf_counter()
            if time.perf_counter() - no_actor_since > lim.place_timeout_s:
                for i in pending:
                    records[i] = _failed_record(grid[i], pair, CBDError(
                        f"no node could hold an interpolation actor (CPU={pool.cpus:g}) for "
                        f"{lim.place_timeout_s:g}s; alive nodes: {_alive_nodes()}"), 0.0)
                pending = []
                break
            time.sleep(lim.poll_s)
            pool.revive()
            continue
        no_actor_since = None
        ready, _ = ray.wait(list(running), num_returns=1, timeout=lim.poll_s)
        now = time.perf_counter()
        for ref in ready or [r for r, (_, _, st) in running.items() if now - st > lim.target_timeout_s][:1]:
            i, slot, t_start = running.pop(ref)
            rec = _collect(ref, grid[i], pair, t_start, out_root, ship_uri, lim, bool(ready))
            if rec.get("retry") and tries[i] <= lim.retries:
                say(f"grid: {grid[i].name} lost with its actor ({rec['error'].splitlines()[0][:160]}); "
                    f"retrying ({tries[i]}/{lim.retries})")
                pool.lose(slot)
                pending.append(i)
                continue
            if rec.get("retry"):
                pool.lose(slot)
            rec.pop("retry", None)
            records[i] = rec
            _progress(say, grid[i], rec, sum(r is not None for r in records), len(grid), t0)
    return [r for r in records if r is not None]


def _collect(ref: Any, t: GridTarget, pair: Any, t_start: float, out_root: Path, ship_uri: str | None,
             lim: Limits, ready: bool) -> dict:
    """The record of one finished (or timed-out) target; ``retry`` when its actor was lost."""
    if not ready:
        ray.cancel(ref, force=True)
        rec = _failed_record(t, pair, TimeoutError(f"no result after {lim.target_timeout_s:g}s"),
                             time.perf_counter() - t_start)
        return {**rec, "retry": True}
    try:
        rec = dict(ray.get(ref))
        rec["status"] = "ok"
        if ship_uri is not None:
            from cbd_ray.storage import delete_dir, download_dir, uri_join

            src = uri_join(ship_uri, t.name)
            download_dir(src, out_root / t.name)
            delete_dir(src)
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
        return {**_failed_record(t, pair, exc, time.perf_counter() - t_start), "retry": True}
    except Exception as exc:  # noqa: BLE001 - one target's failure must not lose the others
        rec = _failed_record(t, pair, exc, time.perf_counter() - t_start)
    rec.setdefault("name", t.name)
    rec["shape"] = _shape_dict(rec.get("shape", t.shape))
    return rec


def _progress(say: Callable[[str], None], t: GridTarget, rec: dict, done: int, total: int, t0: float) -> None:
    elapsed = time.perf_counter() - t0
    eta = elapsed / done * (total - done)
    state = "ok" if rec["status"] == "ok" else f"FAILED: {rec['error'].splitlines()[0][:200]}"
    say(f"[{done}/{total}] {t.name} {shape_label(t.shape)} {state} "
        f"({_fmt_s(float(rec.get('seconds') or 0))}; elapsed {_fmt_s(elapsed)}, ETA {_fmt_s(eta)})")


def plot_grid(records: Sequence[dict], path: str | os.PathLike,
              anchors: Sequence[tuple[int, float]] = ()) -> Path | None:
    """A PNG of the grid: each target at (parameters, α) with its name, the anchors as
    squares, failed targets as crosses. Returns the path (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, a in anchors:
        ax.scatter([p], [a], marker="s", s=60, color="black", zorder=3)
    for r in records:
        a = r.get("alpha")
        a = sum(a) / len(a) if isinstance(a, list) and a else a
        if not isinstance(r.get("params"), int) or not isinstance(a, (int, float)):
            continue
        ok = r.get("status") == "ok"
        ax.scatter([r["params"]], [a], marker="o" if ok else "x", color="tab:blue" if ok else "tab:red", zorder=4)
        ax.annotate(r["name"], (r["params"], a), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("parameters")
    ax.set_ylabel("α (weight of the smaller anchor)")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title("interpolated targets between the anchors (squares)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shape_dict(shape: Any) -> dict:
    return dataclasses.asdict(shape) if dataclasses.is_dataclass(shape) else dict(shape)


def _failed_record(t: GridTarget, pair: Any, exc: BaseException, seconds: float) -> dict:
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    params, alpha = None, t.alpha
    try:
        params = pair.params_of(t.shape)
        alpha = pair.auto_alpha(t.shape) if alpha == "auto" else alpha
    except Exception:  # noqa: BLE001 - the record of a failure must not fail itself
        pass
    return {
        "name": t.name, "shape": t.shape, "params": params, "alpha": alpha, "seconds": round(seconds, 3),
        "path": None, "status": "failed", "error": f"{type(cause).__name__}: {cause}",
    }


def failures(records: Sequence[dict]) -> list[dict]:
    """The records of targets that failed."""
    return [r for r in records if r.get("status") != "ok"]


def format_table(records: Sequence[dict]) -> str:
    """A fixed-width table: target, shape, parameters, α, seconds, path (the error for a
    failed target)."""
    header = ("target", "shape", "parameters", "alpha", "seconds", "path")
    rows = []
    for r in records:
        shape = r.get("shape")
        if isinstance(shape, dict):
            shape = SimpleNamespace(**shape)
        a = r.get("alpha")
        rows.append((
            str(r.get("name", "?")),
            shape_label(shape) if shape is not None else "?",
            f"{r['params']:,}" if isinstance(r.get("params"), int) else "?",
            f"{a:.3f}" if isinstance(a, (int, float)) else f"~{sum(a) / len(a):.3f}" if isinstance(a, list) and a else str(a),
            f"{float(r['seconds']):.2f}" if r.get("seconds") is not None else "?",
            str(r.get("path")) if r.get("status", "ok") == "ok" else f"FAILED: {r.get('error', '').splitlines()[0][:80]}",
        ))
    widths = [max(len(h), *(len(row[k]) for row in rows)) if rows else len(h) for k, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if k in (0, 1, 5) else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in rows]
    return "\n".join(x.rstrip() for x in out)


#: the demo's anchors: tiny GPT-2s of one vocabulary (head_dim 16 in both)
DEMO_ANCHORS = {"small": dict(layers=2, hidden=64, heads=4), "large": dict(layers=4, hidden=128, heads=8)}


def demo_anchors(root: str | os.PathLike, family: str = "gpt2") -> tuple[Path, Path]:
    """Two tiny random anchors of ``family`` (a BPE vocabulary of 512 trained on Python's own
    docs) under ``root/small`` and ``root/large``; reused when already there (they are
    deterministic: seeds 0 and 1)."""
    from cbd_ray.tiny import save_tiny_model, train_bpe_tokenizer

    root = Path(root)
    dirs = root / "small", root / "large"
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    tok = train_bpe_tokenizer(vocab_size=512)
    for seed, (d, key) in enumerate(zip(dirs, ("small", "large"))):
        with atomic_directory(d, overwrite=True) as tmp:
            save_tiny_model(tmp, family, tokenizer=tok, seed=seed, **DEMO_ANCHORS[key])
    return dirs
