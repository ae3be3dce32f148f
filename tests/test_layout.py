"""The house's layout, read from the source with ast (nothing is imported):

- the runtime (what the WebUI loads: scripts/ and lib_unetmods/ except lib_unetmods/lab/ and the
  thin entry modules bench.py, quality.py and soak.py) never imports the lab or the entry modules;
- nothing in lib_unetmods imports from tests/ or names that folder: the lab stands on its own
  (the host stand-ins its benchmark and soak run on live in lib_unetmods/lab/hosts);
- the import graph among lib_unetmods' modules has no cycle. Imports inside functions count: a
  lazy import still ties two modules together (the old bench_cli <-> bench_checkpoint cycle was one).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lib_unetmods"
LAB = f"{PACKAGE}.lab"
ENTRY_MODULES = {f"{PACKAGE}.bench", f"{PACKAGE}.quality", f"{PACKAGE}.soak"}  # `python -m lib_unetmods.bench`: lab-side


def modules_under(root: str, top: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under root/top."""
    found = {}
    for folder, dirs, files in os.walk(os.path.join(root, top)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(folder, name)
    return found


def imported_names(module: str, path: str, known: set[str]) -> set[str]:
    """Absolute names `module` imports, anywhere in the file: `import a.b`, `from a import b`
    (a.b where that is a module in `known`, else a), relative forms resolved, and
    importlib.import_module / __import__ with a constant name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]

    def resolve(name: str, level: int) -> str:
        if level == 0:
            return name
        base = package[: len(package) - (level - 1)]
        return ".".join([*base, name] if name else base)

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module or "", node.level)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in known else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if called in ("import_module", "__import__"):
                target = node.args[0].value
                level = len(target) - len(target.lstrip("."))
                names.add(resolve(target[level:], level))
    return names


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """Each lib_unetmods module -> every name it imports."""
    modules = modules_under(root, PACKAGE)
    return {m: imported_names(m, path, set(modules)) for m, path in modules.items()}


def is_lab_side(module: str) -> bool:
    return module == LAB or module.startswith(f"{LAB}.") or module in ENTRY_MODULES


def runtime_imports_of_lab(root: str = ROOT) -> list[tuple[str, str]]:
    """(runtime module, lab-side name it imports) pairs; scripts/ (the WebUI's entry) included."""
    modules = {**modules_under(root, PACKAGE), **modules_under(root, "scripts")}
    known = set(modules)
    bad = []
    for module, path in sorted(modules.items()):
        if is_lab_side(module):
            continue
        bad += [(module, name) for name in sorted(imported_names(module, path, known)) if is_lab_side(name)]
    return bad


def names_under_tests(root: str = ROOT) -> set[str]:
    """Names importable from tests/ once it is on sys.path (as conftest and the lab put it)."""
    tests = os.path.join(root, "tests")
    tops = {"tests"}
    for name in os.listdir(tests):
        if name.endswith(".py"):
            tops.add(name[:-3])
        elif os.path.isdir(os.path.join(tests, name)) and name != "__pycache__":
            tops.add(name)
    return tops


def imports_from_tests(root: str = ROOT) -> list[tuple[str, str]]:
    """(lib_unetmods module, name under tests/) pairs."""
    tops = names_under_tests(root)
    return [(module, name) for module, names in sorted(import_graph(root).items())
            for name in sorted(names) if name.split(".")[0] in tops]


def paths_into_tests(root: str = ROOT) -> list[str]:
    """lib_unetmods modules with the string "tests" as a path part (os.path.join(..., "tests"),
    "tests/x"): the way a module would put tests/ on sys.path or open a file there."""
    bad = []
    for module, path in sorted(modules_under(root, PACKAGE).items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    (node.value == "tests" or node.value.startswith(("tests/", "tests\\"))):
                bad.append(module)
                break
    return bad


def import_cycles(root: str = ROOT) -> list[list[str]]:
    """Cycles among lib_unetmods modules (one per strongly connected component of 2+ modules,
    or a module that imports itself), each as its sorted member list."""
    graph = import_graph(root)
    edges = {m: sorted(n for n in names if n in graph) for m, names in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan; the package is small, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_sees_the_package():
    """Guards the guards: the walk finds both wings and resolves relative imports."""
    graph = import_graph()
    assert {f"{PACKAGE}.forward", f"{PACKAGE}.techniques.tome", f"{LAB}.bench_run", f"{PACKAGE}.bench"} <= set(graph)
    assert f"{PACKAGE}.patcher" in graph[f"{PACKAGE}.forward"]  # from .patcher import ...
    assert f"{PACKAGE}.params" in graph[f"{PACKAGE}.techniques.tome"]  # from ..params import ...
    assert f"{LAB}.bench" in graph[f"{PACKAGE}.bench"]  # from .lab.bench import main
    assert f"{LAB}.bench_checkpoint" in graph[f"{LAB}.bench_cli"]  # from .bench_checkpoint import ...
    assert f"{LAB}.hosts" in graph[f"{LAB}.soak_runner"]  # from .hosts import use_webui_standin


def test_runtime_never_imports_the_lab():
    assert runtime_imports_of_lab() == []


def test_nothing_in_the_package_loads_from_tests():
    assert imports_from_tests() == []
    assert paths_into_tests() == []


def test_the_guard_sees_a_load_from_tests(tmp_path):
    """Guards the guard: a lab module that imports a test helper or joins a path to tests/ is caught."""
    lab = tmp_path / PACKAGE / "lab"
    lab.mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helper.py").write_text("")
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (lab / "__init__.py").write_text("")
    (lab / "a.py").write_text("import helper\n")
    (lab / "b.py").write_text("import os\nP = os.path.join('x', 'tests')\n")
    assert imports_from_tests(str(tmp_path)) == [(f"{LAB}.a", "helper")]
    assert paths_into_tests(str(tmp_path)) == [f"{LAB}.b"]


def test_package_import_graph_has_no_cycle():
    assert import_cycles() == []
