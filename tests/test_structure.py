"""The shape docs/design.md §6 promises, checked on the source: no import cycle inside
celora_dist (module- or function-level imports), no module writing another object's
underscored attributes, no test hook in the package, launch/train.py's main() a
table of contents, and a repository that cites only its own files."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "celora_dist"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    assert graph["celora_dist.layer"] >= {"celora_dist.selection", "celora_dist.scheduled"}  # the parser sees imports
    assert _cycles(graph) == []


def _foreign_private_writes(tree: ast.AST) -> list[str]:
    """``x._name = ...`` / ``x._name += ...`` / ``setattr(x, "_name", ...)`` with x not self/cls."""
    bad = []

    def check(target: ast.AST, line: int) -> None:
        if isinstance(target, ast.Attribute) and target.attr.startswith("_") and not target.attr.startswith("__"):
            owner = target.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                bad.append(f"line {line}: {ast.unparse(target)}")
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                check(elt, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                check(target, node.lineno)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check(node.target, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_")):
            bad.append(f"line {node.lineno}: setattr(..., {node.args[1].value!r})")
    return bad


def test_the_private_write_finder_sees_one():
    assert _foreign_private_writes(ast.parse("layer._pending = 1\nself._ok = 2\n")) == ["line 1: layer._pending"]


def test_no_module_writes_another_objects_private_attributes():
    bad = {str(p.relative_to(ROOT)): found for p in PACKAGE.rglob("*.py")
           if (found := _foreign_private_writes(ast.parse(p.read_text())))}
    assert bad == {}


def test_no_test_hook_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        assert "CELORA_TEST" not in path.read_text(), path  # fault injection lives in tests/


def test_train_main_is_a_table_of_contents():
    tree = ast.parse((ROOT / "launch" / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60
    assert not [n for n in ast.walk(main) if isinstance(n, (ast.FunctionDef, ast.Lambda)) and n is not main]
    assert "on_optimizer_step" in ast.unparse(main)  # the CE-LoRA hook is visible in the step


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".sh", ".sbatch", ".json", ".toml", ".yaml"))]


def test_the_repository_cites_only_its_own_design_doc():
    files = _tracked_text_files()
    assert any(p.name == "design.md" for p in files)
    offending = [str(p.relative_to(ROOT)) for p in files
                 if p.is_file() and p != Path(__file__) and "DESIGN.md" in p.read_text()]
    assert offending == []
