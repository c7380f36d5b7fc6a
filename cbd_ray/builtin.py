"""The configs that ship with the package: ``--config demo`` finds the built-in ``demo.yaml``.

In a wheel they live in ``cbd_ray/configs/`` (package data, copied there from the checkout's
``configs/`` at build time); in a source checkout they are read from ``configs/`` beside the
package, so there is one copy of each file.
"""
from __future__ import annotations

import logging
from pathlib import Path

from cbd_ray.errors import ConfigError

log = logging.getLogger(__name__)
_SUFFIXES = (".yaml", ".yml")


def config_dir() -> Path | None:
    """The folder of the built-in configs: package data, else the source checkout's."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    if packaged.is_dir():
        return packaged
    checkout = here.parent / "configs"
    if checkout.is_dir() and (here.parent / "pyproject.toml").is_file():
        return checkout
    return None


def builtin_names() -> list[str]:
    """Names of the built-in configs (``demo``, ``smoke``, ...), sorted."""
    root = config_dir()
    return sorted(p.stem for p in root.iterdir() if p.suffix in _SUFFIXES) if root else []


def resolve_config(spec: str | Path) -> Path:
    """A config path from a file path or a built-in name.

    An existing file wins. Otherwise ``demo``, ``demo.yaml`` or ``configs/demo.yaml`` (the
    spelling of the docs, typed in a directory with no checkout) name the built-in file.
    Raises ConfigError naming the value and the built-in names when neither matches.
    """
    path = Path(spec)
    if path.is_file():
        return path
    root = config_dir()
    name = path.name if path.suffix in _SUFFIXES else path.name + ".yaml"
    builtin_like = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs")
    if root is not None and builtin_like and (root / name).is_file():
        if len(path.parts) == 2:
            log.info("%s not found here; using the built-in %s", spec, root / name)
        return root / name
    names = ", ".join(builtin_names()) or "none installed"
    raise ConfigError(f"config file {spec} does not exist and is not a built-in config (built-in: {names})")
