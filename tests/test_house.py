"""How the code reads: module summaries, file sizes, imports with reasons, no import circle."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources() -> dict:
  """{path relative to the root: source} of the package, the recipes and launch.py."""
  found = {"launch.py": None}
  for top in ("hw8jax", "configs"):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        if name.endswith(".py"):
          found[os.path.relpath(os.path.join(folder, name), ROOT)] = None
  for path in found:
    with open(os.path.join(ROOT, path)) as f:
      found[path] = f.read()
  return found


def test_every_module_opens_with_a_one_line_summary():
  """PEP 257: the summary on the first line, then a blank line before any more."""
  for path, source in _sources().items():
    doc = ast.get_docstring(ast.parse(source), clean=False)
    assert doc, f"{path}: no module docstring"
    lines = doc.split("\n")
    assert len(lines) == 1 or not lines[1].strip(), f"{path}: {lines[0]!r} runs on"
    assert len(lines[0]) + 3 <= 100, path


def test_no_file_is_over_300_lines():
  for path, source in _sources().items():
    assert source.count("\n") <= 300, path


def test_an_import_inside_a_function_says_why():
  """Imports are at module level, except where one is optional or costly, and the function
  (a comment or its docstring) says so."""
  for path, source in _sources().items():
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      local = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
      if not local:
        continue
      import_lines = {n.lineno for n in local}
      body = [line for i, line in enumerate(lines[node.lineno - 1:node.end_lineno],
                                            node.lineno) if i not in import_lines]
      comments = [line.split("#", 1)[1] for line in body if "#" in line]
      said = " ".join(comments) + (ast.get_docstring(node) or "")
      for n in local:
        inline = lines[n.lineno - 1].split("#", 1)[1] if "#" in lines[n.lineno - 1] else ""
        assert "import" in (said + inline).lower(), \
            f"{path}:{n.lineno}: a local import with no reason"


def _module_imports(path: str, source: str) -> set:
  """The hw8jax modules `path` imports at module level."""
  found = set()
  for node in ast.parse(source).body:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hw8jax"):
      found.add(node.module)
      found.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("hw8jax"))
  return found


def test_the_package_imports_have_no_circle():
  modules = {}
  for path, source in _sources().items():
    if path.startswith("hw8jax"):
      name = path[:-3].replace(os.sep, ".").removesuffix(".__init__")
      modules[name] = source
  graph = {name: {m for m in _module_imports(name, source) if m in modules and m != name}
           for name, source in modules.items()}
  # A package's __init__ importing its own submodules is how a package exposes them.
  graph = {name: {m for m in deps if not m.startswith(name + ".")}
           for name, deps in graph.items()}
  state = {}

  def visit(name, trail):
    if state.get(name) == "done":
      return
    assert state.get(name) != "open", " -> ".join([*trail, name])
    state[name] = "open"
    for dep in sorted(graph[name]):
      visit(dep, [*trail, name])
    state[name] = "done"

  for name in sorted(graph):
    visit(name, [])
