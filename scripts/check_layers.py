"""Fail when the modules of a Rust crate import each other in a cycle.

Reads every module file under the crate's ``src`` (``lib.rs``, the crate
root, is left out: it only declares and re-exports), finds the modules each
one refers to (``crate::a::b``, ``super::x``, ``self::x`` and the names of
its own child modules), and reports every strongly connected group of two or
more modules. Test code counts too: a test that reaches up a layer is a
cycle like any other.

Usage: ``python scripts/check_layers.py [SRC_DIR]`` (default: the engine
crate's ``src``). Exits 1 and lists the cycles when there are any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DEFAULT_SRC = Path(__file__).resolve().parent.parent / "crates" / "warpsocket-core" / "src"

_STRIP = re.compile(
    r"""
      //[^\n]*                     # line comment
    | /\*.*?\*/                    # block comment
    | b?r(?P<hashes>\#*)".*?"(?P=hashes)  # raw string
    | b?"(?:\\.|[^"\\])*"          # string
    | b?'(?:\\.|[^'\\])'           # char literal (not a lifetime)
    """,
    re.VERBOSE | re.DOTALL,
)
_PATH = re.compile(r"\b(crate|super|self)((?:\s*::\s*(?:\w+|\{|\*))+)")
_INLINE_MOD = re.compile(r"\bmod\s+(\w+)\s*\{")
_CHILD_DECL = re.compile(r"\bmod\s+(\w+)\s*;")


def module_name(src: Path, file: Path) -> tuple[str, ...]:
    """The module path of a file: ``cluster/mod.rs`` is ``("cluster",)``."""
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return tuple(parts)


def strip(code: str) -> str:
    """The code with comments, strings and char literals blanked out.

    They may hold braces, or text that looks like a path.
    """
    return _STRIP.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), code)


def _group(code: str, start: int) -> str:
    """The text of the brace group opening at ``code[start]``."""
    depth = 0
    for i in range(start, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return code[start + 1 : i]
    return code[start + 1 :]


def _first_segments(group: str) -> list[str]:
    """The first path segment of each item of a ``use`` group."""
    items, depth, current = [], 0, ""
    for ch in group:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        current += ch
    items.append(current)
    return [m.group(1) for item in items if (m := re.match(r"\s*(\w+)", item))]


def references(code: str, here: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Module paths that ``code``, the text of module ``here``, refers to.

    A path may go on with item names after the module's.
    """
    code = strip(code)
    # Inline modules (`mod tests { ... }`) shift what `super` and `self` mean.
    scopes: list[tuple[int, int, tuple[str, ...]]] = []
    for m in _INLINE_MOD.finditer(code):
        body_start = m.end() - 1
        body = _group(code, body_start)
        scopes.append((body_start, body_start + len(body) + 2, (m.group(1),)))

    def scope_at(pos: int) -> tuple[str, ...]:
        inner: tuple[str, ...] = ()
        for start, end, name in scopes:
            if start <= pos < end:
                inner += name
        return here + inner

    found: set[tuple[str, ...]] = set()
    for m in _PATH.finditer(code):
        base = {"crate": (), "self": scope_at(m.start()), "super": scope_at(m.start())[:-1]}[m.group(1)]
        segments = [s.strip() for s in m.group(2).split("::") if s.strip()]
        if m.group(1) == "super":
            # `super::super::x`: each extra `super` climbs one more level.
            while segments and segments[0] == "super":
                segments.pop(0)
                base = base[:-1]
        if segments and segments[-1] == "{":
            group = _group(code, m.end() - 1)
            found.update(base + tuple(segments[:-1]) + (first,) for first in _first_segments(group))
        else:
            found.add(base + tuple(segments))
    for child in _CHILD_DECL.findall(code):
        if re.search(rf"\b{child}\s*::", code):
            found.add((*here, child))
    return found


def module_graph(src: Path) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """For each module file under ``src``, the other module files it uses."""
    files = {module_name(src, f): f for f in sorted(src.rglob("*.rs")) if f != src / "lib.rs"}
    graph: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for name, file in files.items():
        uses = set()
        for path in references(file.read_text(encoding="utf-8"), name):
            # The longest prefix that is a module file: `crate::frame::close_code::X`
            # is a use of `frame`.
            for n in range(len(path), 0, -1):
                if path[:n] in files:
                    if path[:n] != name:
                        uses.add(path[:n])
                    break
        graph[name] = uses
    return graph


def cycles(graph: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[list[tuple[str, ...]]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[tuple[str, ...], int] = {}
    low: dict[tuple[str, ...], int] = {}
    stack: list[tuple[str, ...]] = []
    on_stack: set[tuple[str, ...]] = set()
    found: list[list[tuple[str, ...]]] = []

    def visit(node: tuple[str, ...]) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main(argv: list[str]) -> int:
    """Checks the crate at ``argv[0]`` (or the engine crate); 1 on a cycle."""
    src = Path(argv[0]) if argv else DEFAULT_SRC
    graph = module_graph(src)
    found = cycles(graph)
    for component in found:
        names = ["::".join(m) for m in component]
        sys.stderr.write(f"module cycle in {src}: {', '.join(names)}\n")
        members = set(component)
        for m in component:
            inside = sorted("::".join(u) for u in graph[m] if u in members)
            sys.stderr.write(f"  {'::'.join(m)} uses {', '.join(inside)}\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
