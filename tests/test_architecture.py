"""The package layout (docs/architecture.md): no import cycle, and every ``dynmole.*`` name the
README and docs give resolves."""

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dynmole"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The dynmole modules ``path`` (module ``name``) imports: ``from . import x`` imports module x, or the
    package when x is a name in it (as ``from . import __version__`` did)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_import_cycle():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path, name, set(modules)) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, chain: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*chain[chain.index(target):], target])
            if target not in state:
                visit(target, [*chain, target])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])


def test_names_the_docs_give_resolve():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = {n for path in texts for n in re.findall(r"dynmole(?:\.[A-Za-z_]\w*)+", path.read_text())}
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj, rest = importlib.import_module(".".join(parts[:i])), parts[i:]
                break
            except ImportError:
                continue
        for part in rest:
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(name)
    assert not missing, missing


def test_paths_the_docs_give_exist():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    paths = {p for path in texts for p in re.findall(r"(?:src/)?dynmole/[\w/]+\.py", path.read_text())}
    missing = [p for p in sorted(paths) if not (ROOT / "src" / p.removeprefix("src/")).is_file()]
    assert not missing, missing
