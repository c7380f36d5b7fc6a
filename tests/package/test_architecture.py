"""The package's shape: layers (cbd_ray/layers.py), no import circles, no private names
across modules, short functions, and docs/architecture.md in step with the code.

Pure AST reading of cbd_ray/: milliseconds, nothing imported but cbd_ray.layers.
"""
from __future__ import annotations

import ast
import re

from cbd_ray import layers

from conftest import ROOT

PAGE = ROOT / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 80


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_are_found_lazy_imports_included():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_at_any_depth_relative_ones_included(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\n\ndef g():\n    from cbd_ray.resize import _hidden\n    from . import chain\n"
                 "    from ..errors import CBDError\n")
    got = layers.imports_of("cbd_ray.stages.m", f, {"cbd_ray.stages.chain", "cbd_ray.resize", "cbd_ray.errors"})
    assert got == [("cbd_ray.resize", "_hidden", 5), ("cbd_ray.stages.chain", "", 6), ("cbd_ray.errors", "CBDError", 7)]


def test_no_import_circle_in_the_package():
    assert _circles(layers.import_graph()) == []


def test_every_module_has_a_layer():
    assert [m for m in layers.modules() if layers.layer_of(m) is None] == []


def test_no_import_runs_up_the_layers():
    graph = layers.import_graph()
    names = [name for name, _, _ in layers.LAYERS]
    up = [f"{a} ({names[layers.layer_of(a)]}) imports {b} ({names[layers.layer_of(b)]})"
          for a in sorted(graph) for b in sorted(graph[a]) if layers.layer_of(b) > layers.layer_of(a)]
    assert up == []


def test_no_private_name_is_imported_from_another_module():
    mods = layers.modules()
    bad = [f"{layers.short(m)}:{line} imports {name} from {layers.short(src)}"
           for m, p in mods.items() for src, name, line in layers.imports_of(m, p, set(mods))
           if name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and src != m]
    assert bad == []


def test_no_import_of_the_package_falls_back_on_import_error():
    """The package's own modules always exist: no ``try: from cbd_ray... except ImportError``
    guarding a copy of their code."""
    guarded = []
    for p in sorted((ROOT / "cbd_ray").rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if not isinstance(n, ast.Try):
                continue
            catches = {ast.unparse(h.type) for h in n.handlers if h.type is not None}
            ours = [i for stmt in n.body for i in ast.walk(stmt) if isinstance(i, ast.ImportFrom)
                    and (i.module or "").split(".")[0] == "cbd_ray"]
            if ours and any("ImportError" in c or "ModuleNotFoundError" in c for c in catches):
                guarded.append(f"{p.relative_to(ROOT)}:{n.lineno}")
    assert guarded == []


def test_no_function_is_longer_than_80_lines():
    long = []
    for p in sorted((ROOT / "cbd_ray").rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_layer_map_names_only_modules_that_exist():
    mods = {layers.short(m) for m in layers.modules()}
    stale = [n for _, _, names in layers.LAYERS for n in names
             if not any(m == n or m.startswith(n + ".") for m in mods)]
    assert stale == []


def test_the_committed_diagram_is_what_the_code_draws():
    page = PAGE.read_text()
    assert layers.with_diagram(page) == page, "run: python -m cbd_ray.layers"


def test_every_file_and_module_the_architecture_page_names_exists():
    page = PAGE.read_text()
    named = set(re.findall(r"(?<![\w./-])((?:cbd_ray|tests|jobs|configs|docs|bench|cluster)/[\w./-]*\w)", page))
    assert named, "the page names no files"
    assert sorted(n for n in named if not (ROOT / n).exists()) == []
    mods = set(layers.modules())
    dotted = set(re.findall(r"\bcbd_ray(?:\.\w+)+", page))  # a module, or a module's attribute
    assert sorted(d for d in dotted if d not in mods and d.rpartition(".")[0] not in mods - {"cbd_ray"}) == []


def test_the_tests_map_lists_every_test_file_in_its_folder():
    """tests/README.md: each concept folder's row names exactly the test files in it."""
    page = (ROOT / "tests" / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)/` \|.*\| (.*) \|$", page, re.M))
    folders = {p.parent.name for p in (ROOT / "tests").glob("*/test_*.py")}
    assert set(rows) == folders
    for folder, files in rows.items():
        listed = set(re.findall(r"`(test_\w+)`", files))
        assert listed == {p.stem for p in (ROOT / "tests" / folder).glob("test_*.py")}, folder
    assert not list((ROOT / "tests").glob("test_*.py")), "a test file outside every concept folder"
