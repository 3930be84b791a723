"""The shape of the code (docs/ARCHITECTURE.md): one job per module, stated first; no import circle, counting
imports inside functions; kernels/ never imports pipeline/; reading results never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "pipeline")


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def first_party_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every first-party module ``name`` imports anywhere in its file (module level or inside functions),
    except under ``if TYPE_CHECKING:`` (never executed)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: first_party_imports(name, path, modules) for name, path in modules.items()}


def test_no_import_circle_even_through_imports_inside_functions():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_circle_through_a_function_local_import(tmp_path):
    """The circle test above can fail: two modules that import each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert first_party_imports("a", modules["a"], modules) == {"b"}
    assert first_party_imports("b", modules["b"], modules) == {"a"}


def test_kernels_never_import_pipeline():
    bad = {name: sorted(t for t in targets if t.startswith("pipeline"))
           for name, targets in import_graph().items() if name.startswith("kernels")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("name", sorted(module_files()))
def test_every_module_states_its_one_job_in_its_first_docstring_line(name):
    doc = ast.get_docstring(ast.parse(module_files()[name].read_text()))
    assert doc, f"{name}: no module docstring"
    first = doc.strip().splitlines()[0]
    assert len(first.split()) >= 4, f"{name}: first docstring line {first!r} does not state a job"


@pytest.mark.parametrize("command", [["status"], ["query", "SELECT width, count(*) FROM runs GROUP BY width"],
                                     ["query", "SELECT count(*) FROM gp_init"]])
def test_reading_results_imports_no_torch(small_results, command):
    """``ntk-sweep status`` and ``query`` (aggregates and gp_init included) in a fresh interpreter: torch
    never loaded."""
    args = [command[0], str(small_results), *command[1:]]
    code = ("import sys\nfrom pipeline.cli import main\n"
            f"rc = main({args!r})\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'matplotlib'))\n"
            "print('HEAVY', heavy[:5])\nsys.exit(rc or (3 if heavy else 0))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout
