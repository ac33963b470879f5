"""The import graph of `affectjax`: dependencies run one way (no loops).

Parses every module's imports (module level and inside functions alike: a
function-level import is still a dependency, only a later one) and fails
naming the loop if one module imports another that imports it back, directly
or through others.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "affectjax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The affectjax modules ``path`` imports (``from pkg import mod`` counts
  as importing ``pkg.mod`` when that is a module, else ``pkg``)."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                 else base for alias in node.names]
    else:
      continue
    found.update(t for t in targets if t in modules and t != name)
  return found


def import_graph() -> dict[str, set[str]]:
  paths = sorted(PACKAGE.rglob("*.py"))
  modules = {_module_name(p) for p in paths}
  return {_module_name(p): _imports(p, modules) for p in paths}


def find_loop(graph: dict[str, set[str]]) -> list[str] | None:
  """One import loop as [a, b, ..., a], or None (depth-first search)."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done.
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (loop := visit(nxt)):
        return loop
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (loop := visit(node)):
      return loop
  return None


def test_finder_sees_function_level_and_indirect_loops():
  assert find_loop({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_loop({"a": {"b"}, "b": set()}) is None
  graph = import_graph()
  # Parsed for real: module-level and function-level imports both count.
  assert "affectjax.train_state" in graph["affectjax.train"]
  assert "affectjax.scoring" in graph["affectjax.workdir"]  # Inside a method.


def test_no_import_loop_in_affectjax():
  loop = find_loop(import_graph())
  assert loop is None, "import loop: " + " -> ".join(loop)
