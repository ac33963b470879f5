"""The import graph of `affectjax` and `data_prep`: dependencies run one way.

Parses every module's imports (module level and inside functions alike: a
function-level import is still a dependency, only a later one) and fails
naming the loop if one module imports another that imports it back, directly
or through others. Between the packages the rule is one-way too: `data_prep`
uses `affectjax` (the record format, the face crop), `affectjax` never
imports `data_prep` (training and serving must not need the converter).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("affectjax", "data_prep")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The modules among ``modules`` that ``path`` imports (``from pkg import
  mod`` counts as importing ``pkg.mod`` when that is a module, else
  ``pkg``)."""
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
  """Module -> the modules of PACKAGES it imports."""
  paths = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
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


def test_no_import_loop_in_affectjax_or_data_prep():
  graph = import_graph()
  assert "data_prep.registry" in graph and "affectjax.train" in graph
  loop = find_loop(graph)
  assert loop is None, "import loop: " + " -> ".join(loop)


def test_affectjax_never_imports_data_prep():
  graph = import_graph()
  assert "affectjax.data" in graph["data_prep.shards"]  # Seen across both.
  wrong = {m: sorted(d for d in deps if d.split(".")[0] == "data_prep")
           for m, deps in graph.items() if m.split(".")[0] == "affectjax"}
  wrong = {m: d for m, d in wrong.items() if d}
  assert not wrong, f"affectjax imports data_prep: {wrong}"


def test_layouts_sit_below_the_registry():
  """The layout modules import neither each other nor the registry; only
  the registry (and the driver above it) sees them all."""
  graph = import_graph()
  layouts = {"data_prep.layouts", "data_prep.public_sets", "data_prep.rafdb"}
  for m in layouts:
    assert not graph[m] & (layouts | {"data_prep.registry",
                                      "data_prep.prepare"}), (m, graph[m])
  assert layouts <= graph["data_prep.registry"]
  assert graph["data_prep.rows"] <= {"data_prep.labels", "affectjax.face_crop"}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  """Every module ``start`` imports, directly or through others."""
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_split_off_modules_sit_below_the_module_they_serve():
  """A module split off for its own concern (issue 27) is used by the one
  it came from and never reaches back to it: the error meanings and Orbax's
  log routing below the checkpointer, the cache's locations below the cache,
  the manifest and the rerun state below the driver, one face below the
  synthetic dataset."""
  graph = import_graph()
  below = {
      "affectjax.checkpoint": {"affectjax.checkpoint_errors",
                               "affectjax.orbax_logging",
                               "affectjax.orbax_internals"},
      "affectjax.pixel_cache": {"affectjax.cache_location"},
      "data_prep.prepare": {"data_prep.manifest", "data_prep.output_state"},
      "data_prep.synthetic": {"data_prep.synthetic_face"},
  }
  for owner, parts in below.items():
    assert parts <= graph[owner], (owner, parts - graph[owner])
    for part in parts:
      assert owner not in _reachable(graph, part), (part, owner)
