"""The modules of the ``warpsocket`` package import one another without a cycle.

Every import counts, those under ``if TYPE_CHECKING:`` and inside functions too:
a module that needs another only for a type still depends on it. ``from . import
name`` is an import of the submodule ``name`` when there is one, else of the
package's ``__init__``; the package's ``__init__`` being run first by any import
of a submodule is not counted.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "warpsocket"
CHECK_LAYERS = ROOT / "scripts" / "check_layers.py"


def _modules() -> dict[str, Path]:
    return {path.stem: path for path in PACKAGE.glob("*.py")}


# Submodules without Python source: the native module (typed by _core.pyi) imports none.
NATIVE = {path.stem for path in PACKAGE.glob("*.pyi")}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that the module ``name`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "warpsocket":
                continue
            if node.level > 1:
                raise AssertionError(f"{name}: a relative import above the package")
            parts = (node.module or "").split(".")
            if node.level == 0:
                parts = parts[1:]
            target = parts[0] if parts and parts[0] else None
            if target is None:
                # from . import a, b: submodules, or names of the package's __init__.
                for alias in node.names:
                    found.add(alias.name if alias.name in modules else "__init__")
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "warpsocket":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    found &= modules | {"__init__"}
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules: the Rust layer check's finder."""
    spec = importlib.util.spec_from_file_location("check_layers", CHECK_LAYERS)
    assert spec is not None and spec.loader is not None
    check_layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_layers)
    return check_layers.cycles(graph)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules) | NATIVE) for name, path in modules.items()}
    assert graph["server"], "the import parser found nothing: it is broken"
    assert "metrics" in graph["server"]
    assert _cycles(graph) == []
