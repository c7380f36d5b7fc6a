"""The package is the product: one `cbd` command for every job, built-in configs found by
name, `--help` without heavy imports, `cbd validate` on every shipped config, and the wheel
built from this checkout running the smoke chain from a directory with no checkout."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cbd_ray import cli
from cbd_ray.builtin import builtin_names, resolve_config
from cbd_ray.errors import ConfigError
from conftest import ROOT, SMOKE_ONE_ANCHOR

HEAVY = ("torch", "ray", "transformers")

_HELP_PROBE = """
import contextlib, io, json, sys
from cbd_ray.cli import COMMANDS, main
seen = {}
for name in [None, *COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["--help"] if name is None else [name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (name, exc.code)
    seen[name or "cbd"] = sorted(m for m in %r if m in sys.modules)
print(json.dumps(seen))
"""


def test_help_of_every_subcommand_imports_no_torch_ray_or_transformers():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _HELP_PROBE % (HEAVY,)], capture_output=True, text=True,
                       env=env, timeout=120, check=True)
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(seen) == {"cbd", *cli.COMMANDS}
    assert {"build-chain", "tune", "grid", "reproduce"} <= set(seen)
    assert all(mods == [] for mods in seen.values()), seen


def test_version_and_quiet_verbose_on_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cbd-ray {cli.version()}"
    for name in cli.COMMANDS:
        parser = cli.build_parser(only=name)
        sub = parser._subparsers._group_actions[0].choices[name]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= flags, name
    assert cli.main(["configs", "-q"]) == 0
    assert logging.getLogger("cbd_ray").level == logging.WARNING
    assert cli.main(["configs", "-v"]) == 0
    assert logging.getLogger("cbd_ray").level == logging.DEBUG
    assert cli.main(["configs"]) == 0
    assert logging.getLogger("cbd_ray").level == logging.INFO
    assert "smoke" in capsys.readouterr().out.split()


def test_builtin_configs_are_found_by_name_and_a_path_still_wins(tmp_path, monkeypatch):
    assert {"demo", "smoke", "grid_demo", "reproduce_tiny"} <= set(builtin_names())
    assert resolve_config("smoke") == ROOT / "configs" / "smoke.yaml"
    assert resolve_config("demo.yaml") == ROOT / "configs" / "demo.yaml"
    own = tmp_path / "smoke"
    own.write_text("run: {name: mine}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("smoke") == Path("smoke")  # a file of that name here wins
    assert resolve_config("configs/demo.yaml") == ROOT / "configs" / "demo.yaml"  # the docs' spelling
    with pytest.raises(ConfigError, match=r"nope.yaml does not exist .*built-in: .*smoke"):
        resolve_config("nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_validate_passes_on_every_shipped_config(path, capsys):
    assert cli.main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert ": ok (" in capsys.readouterr().out


def test_validate_tells_kinds_apart_and_refuses_an_unknown_one(tmp_path, capsys):
    assert cli.main(["validate", "grid_demo"]) == 0
    assert "ok (grid" in capsys.readouterr().out
    tune = tmp_path / "tune.yaml"
    tune.write_text("alphas: [0.0, 0.5, 1.0]\nscheduler: fifo\n")
    assert cli.main(["validate", str(tune)]) == 0
    assert "ok (tune settings)" in capsys.readouterr().out
    tune.write_text("alphas: [0.0, 2.0]\n")
    assert cli.main(["validate", str(tune)]) == 2
    assert "alphas" in capsys.readouterr().err
    odd = tmp_path / "odd.yaml"
    odd.write_text("colour: blue\n")
    assert cli.main(["validate", str(odd)]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "chain, reproduce, grid, tune" in err


def test_job_scripts_are_wrappers_of_the_cli(capsys):
    for script, command in [("build_chain", "build-chain"), ("tune_alpha", "tune"), ("interpolate_grid", "grid"),
                            ("reproduce", "reproduce"), ("pseudo_label", "pseudo-label"),
                            ("evaluate", "evaluate-many")]:
        text = (ROOT / "jobs" / f"{script}.py").read_text()
        assert f'job_main("{command}"' in text and len(text.splitlines()) < 30, script
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_chain.py"), "--help"], capture_output=True,
                       text=True, timeout=60, check=True)
    assert "--from-stage" in r.stdout


# ------------------------------------------------------------------ the wheel


def _build_wheel(out: Path) -> Path:
    """The wheel of this checkout (hatchling from the running venv: no network)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    return next(out.glob("cbd_ray-*.whl"))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_wheel_runs_the_smoke_chain_from_a_directory_without_a_checkout(tmp_path, ray_apart):
    """ray_apart: the installed command starts a Ray of its own, beside the session's."""
    pytest.importorskip("hatchling")

    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("cbd_ray/configs/")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert "cbd_ray/cli.py" in names and "cbd_ray/commands/build_chain.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the dependencies come from the running venv
    env.pop("RAY_ADDRESS", None)
    where = subprocess.run([sys.executable, "-c", "import cbd_ray.cli as c; print(c.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    cbd = site / "bin" / "cbd"
    r = subprocess.run([str(cbd), "build-chain", "--config", "smoke", "--storage", str(tmp_path / "runs"),
                        *SMOKE_ONE_ANCHOR],
                       cwd=work, env=env, capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    manifest = json.loads((tmp_path / "runs" / "smoke" / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in manifest["order"])
    assert (tmp_path / "runs" / "smoke" / "report.md").is_file() and not (work / "configs").exists()
