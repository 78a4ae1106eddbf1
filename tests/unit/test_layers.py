"""Who may import whom (README, "Layout"), checked from the source: every import, also the ones
inside functions, except a module's `if __name__ == "__main__":` block (a script's entry)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"slmflow": REPO / "src" / "slmflow", "flows": REPO / "flows", "tasks": REPO / "tasks"}


def _module_name(root: str, folder: Path, file: Path) -> str:
    parts = [root, *file.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(root, folder, f): f
            for root, folder in ROOTS.items() for f in sorted(folder.rglob("*.py"))}


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def _imported(file: Path, known: set[str]) -> set[str]:
    """Project modules `file` imports (a package's __init__ counts when a submodule is named)."""
    tree = ast.parse(file.read_text(), str(file))
    skip = {id(n) for top in tree.body if _is_main_block(top) for n in ast.walk(top)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(file, known) - {name} for name, file in modules.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_import_cycles():
    graph = _graph()
    # A package imports its own submodules (stages/__init__ builds the table from them); the
    # submodules' import of their package is Python's, not a design dependency.
    edges = {m: {d for d in deps if not _under(m, d)} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


RULES = [
    # (importer prefix, forbidden prefix, why)
    ("slmflow.stages", "flows", "a stage is a plain function: the flow wires stages, not the reverse"),
    ("slmflow.stages", "tasks", "Prefect wraps stages; stages do not know Prefect"),
    ("slmflow.stages", "slmflow.preflight", "preflight checks a run before the stages"),
    ("slmflow.stages", "slmflow.cli", "the CLI is the front door"),
    ("tasks", "flows", "the flow uses the tasks"),
]


def test_stages_tasks_and_flow_import_downwards_only():
    graph = _graph()
    broken = [f"{m} imports {d}: {why}" for m, deps in graph.items() for d in deps
              for who, banned, why in RULES if _under(m, who) and _under(d, banned)]
    assert broken == [], "\n".join(broken)


def test_the_core_never_imports_the_azureml_plugin():
    """AzureML inputs plug in through the `slmflow.schemes` entry points."""
    graph = _graph()
    core = [m for m in graph if not _under(m, "slmflow.azureml")]
    broken = [f"{m} imports {d}" for m in core for d in graph[m] if _under(d, "slmflow.azureml")]
    assert broken == [], "\n".join(broken)


def test_the_library_does_not_import_the_orchestration():
    """slmflow's modules work without the flow and the tasks; only the CLI starts the flow."""
    graph = _graph()
    broken = [f"{m} imports {d}" for m in graph if _under(m, "slmflow") and m != "slmflow.cli"
              for d in graph[m] if _under(d, "flows") or _under(d, "tasks")]
    assert broken == [], "\n".join(broken)


def test_the_config_imports_no_io_module():
    """The config tree validates shapes only: errors, template fields, URI and path shapes."""
    allowed = {"slmflow.errors", "slmflow.textformat", "slmflow.uris", "slmflow.pathcheck"}
    graph = _graph()
    imported = {d for m, deps in graph.items() if _under(m, "slmflow.config") for d in deps
                if _under(d, "slmflow") and not _under(d, "slmflow.config")} - {"slmflow"}
    assert imported <= allowed, imported - allowed


def test_every_test_module_has_its_own_basename():
    # pytest's default import mode refuses two test files of one basename (CI stops at collection)
    from collections import Counter

    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
