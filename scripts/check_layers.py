"""Fail when the modules of a Rust crate use each other out of layer order.

Reads every module file under the crate's ``src`` (``lib.rs``, the crate
root, is left out: it only declares and re-exports), finds the modules each
one refers to (``crate::a::b``, ``super::x``, ``self::x`` and the names of
its own child modules), and reports:

* every strongly connected group of two or more modules (a cycle);
* when ``lib.rs`` declares its layers, every use of a module that is not
  below the user in that order, and every module missing from the list or
  listed but absent.

The layer list is the part of ``lib.rs``'s doc comment between the lines
``//! <!-- layers -->`` and ``//! <!-- /layers -->``: numbered items
(``1.``, ``2.``, ...), lowest layer first, each naming its modules in
backticks (``cluster::wire`` for a child module); text outside backticks is
for the reader. The rule: a module may use the modules of every layer below
its own, and those listed before it in its own layer. The list thus reads as
one order, lowest first, which is what makes it sound: any use allowed goes
strictly down that order, so no cycle can pass. Test code counts too: a
test that reaches up a layer breaks the order like any other use.

Usage: ``python scripts/check_layers.py [SRC_DIR]`` (default: the engine
crate's ``src``). Exits 1 and lists the problems when there are any.
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


_LAYERS = re.compile(r"<!--\s*layers\s*-->(.*?)<!--\s*/layers\s*-->", re.DOTALL)
_ITEM = re.compile(r"^\s*\d+\.\s", re.MULTILINE)


def layers(lib_rs: str) -> list[list[tuple[str, ...]]] | None:
    """The layer list of ``lib.rs``'s doc comment, lowest first; None if absent.

    Each layer is its modules in the order listed.
    """
    doc = "\n".join(line.strip()[3:] for line in lib_rs.splitlines() if line.strip().startswith("//!"))
    block = _LAYERS.search(doc)
    if block is None:
        return None
    items = _ITEM.split(block.group(1))[1:]
    return [[tuple(name.split("::")) for name in re.findall(r"`(\w+(?:::\w+)*)`", item)] for item in items]


def order_violations(
    graph: dict[tuple[str, ...], set[tuple[str, ...]]], listed: list[list[tuple[str, ...]]]
) -> list[str]:
    """What breaks the layer order: a use not below the user, a module missing or unknown."""
    rank: dict[tuple[str, ...], tuple[int, int]] = {}
    problems = []
    for layer, names in enumerate(listed, start=1):
        for position, name in enumerate(names):
            if name in rank:
                problems.append(f"{'::'.join(name)} is listed twice")
            rank.setdefault(name, (layer, position))
    for name in sorted(set(rank) - set(graph)):
        problems.append(f"{'::'.join(name)} is listed in the layers but is no module of the crate")
    for name in sorted(set(graph) - set(rank)):
        problems.append(f"{'::'.join(name)} is missing from the layers of lib.rs")
    for user in sorted(graph):
        for used in sorted(graph[user]):
            if user in rank and used in rank and rank[used] >= rank[user]:
                higher = rank[used][0] > rank[user][0]
                where = "a higher layer" if higher else "its own layer, listed after it"
                problems.append(
                    f"{'::'.join(user)} (layer {rank[user][0]}) uses {'::'.join(used)} "
                    f"(layer {rank[used][0]}): {where}"
                )
    return problems


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
    """Checks the crate at ``argv[0]`` (or the engine crate); 1 on a cycle or a use out of order."""
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
    lib_rs = src / "lib.rs"
    listed = layers(lib_rs.read_text(encoding="utf-8")) if lib_rs.exists() else None
    problems = order_violations(graph, listed) if listed is not None else []
    for problem in problems:
        sys.stderr.write(f"layer order in {src}: {problem}\n")
    return 1 if found or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
