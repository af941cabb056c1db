"""The trafl_jax modules import each other one way: no cycles, deferred imports included.

A cycle hidden by a function-level import (checkpoint -> convert -> checkpoint) or by an import placed
after the names it needs (tasks/__init__ -> tasks.code -> tasks) works until someone moves a line. The
graph is read from the source (AST), so it needs no imports and sees imports inside functions too. Left
out: a program's own wiring, i.e. imports in `main()` or under `if __name__ == "__main__":` (run as a
program, the module is `__main__`, not the library module its imports could cycle back to), and the
implicit import of a package's `__init__` before its submodules.
"""

import ast
import os

import pytest

from .conftest import ROOT

PACKAGE = "trafl_jax"


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
        modules[dotted.removesuffix(".__init__")] = path
  return modules


def _is_program_wiring(node: ast.AST) -> bool:
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return node.name == "main"
  return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def _imports(tree: ast.AST):
  """Every Import / ImportFrom node, at any depth, outside program wiring."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    elif not _is_program_wiring(node):
      yield from _imports(node)


def _graph(modules: dict[str, str]) -> dict[str, set[str]]:
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = set()
    for node in _imports(tree):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names if a.name in modules}
        continue
      base = node.module or ""
      if node.level:  # relative: from . import x, from ..tasks import y
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        # `from pkg import sub` imports the submodule; `from mod import name` imports mod.
        full = f"{base}.{alias.name}"
        if full in modules:
          targets.add(full)
        elif base in modules:
          targets.add(base)
    graph[name] = targets - {name}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (as a path that returns to its start) per strongly connected component."""
  cycles, state = [], {}  # state: 1 = on the current path, 2 = done

  def visit(node, path):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycles.append(path[path.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt, path)
    path.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  return cycles


def test_the_graph_sees_every_kind_of_import():
  graph = _graph(_modules())
  assert "trafl_jax.tasks.base" in graph["trafl_jax.tasks.code"]  # from pkg import submodule
  assert "trafl_jax.tasks.base" in graph["trafl_jax.tasks"]  # a package's own submodule
  assert "trafl_jax.hf_format" in graph["trafl_jax.checkpoint"]
  assert "trafl_jax.checkpoint" in graph["trafl_jax.convert"]


@pytest.mark.parametrize(
  "sources, cycle",
  [
    # The two cycles this test was written against, in their old form.
    (
      {
        "checkpoint": "def restore():\n  from trafl_jax import convert\n",
        "convert": "from trafl_jax import checkpoint\n",
      },
      ["trafl_jax.checkpoint", "trafl_jax.convert", "trafl_jax.checkpoint"],
    ),
    (
      {
        "tasks/__init__": "X = 1\nfrom trafl_jax.tasks import code  # noqa: E402\n",
        "tasks/code": "from trafl_jax import tasks\n",
      },
      ["trafl_jax.tasks", "trafl_jax.tasks.code", "trafl_jax.tasks"],
    ),
    # Program wiring is not a library import.
    ({"a": "from trafl_jax import b\n", "b": "def main():\n  from trafl_jax import a\n"}, None),
  ],
)
def test_cycle_detection_on_known_shapes(tmp_path, sources, cycle):
  modules = {}
  for name, text in sources.items():
    path = tmp_path / PACKAGE / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    modules[f"{PACKAGE}.{name.replace('/', '.')}".removesuffix(".__init__")] = str(path)
  found = _cycles(_graph(modules))
  assert found == ([cycle] if cycle else [])


def test_no_import_cycles_among_trafl_jax_modules():
  cycles = _cycles(_graph(_modules()))
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
