"""scripts/check_layers.py: it must catch a module cycle, however it is spelled, and a use
that goes up the layer order lib.rs declares."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_layers.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_crate(root: Path, files: dict[str, str]) -> Path:
    src = root / "src"
    for name, code in {"lib.rs": "mod a;\nmod b;\n", **files}.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code), encoding="utf-8")
    return src


def run(src: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "b_uses_a",
    [
        "use crate::a::Thing;",
        "use crate::{c::C, a::Thing};",
        "use crate::{\n    a::{self, Thing},\n};",
        "fn f() -> usize { crate::a::size() }",
        "use crate::a;",
    ],
)
def test_a_cycle_of_two_fails(tmp_path, b_uses_a):
    src = write_crate(
        tmp_path,
        {"a.rs": "use crate::b::Other;\n", "b.rs": b_uses_a + "\n", "c.rs": "pub struct C;\n"},
    )
    result = run(src)
    assert result.returncode == 1
    assert "module cycle" in result.stderr
    assert "a, b" in result.stderr


def test_a_layered_crate_passes(tmp_path):
    src = write_crate(
        tmp_path,
        {
            "a.rs": """
                //! Mentions crate::b only in a comment.
                use crate::c::C;
                const TEXT: &str = "crate::b::{X}";
                #[cfg(test)]
                mod tests {
                    use super::*;
                    use super::super::c::C;
                }
            """,
            "b.rs": "use crate::a::Thing;\nuse crate::c::{self, C};\n",
            "c.rs": "pub struct C;\n",
        },
    )
    result = run(src)
    assert result.returncode == 0, result.stderr


def test_a_cycle_through_a_directory_module_is_found(tmp_path):
    src = write_crate(
        tmp_path,
        {
            "a.rs": "use crate::b::inner::f;\n",
            "b/mod.rs": "mod inner;\nuse inner::g;\n",
            "b/inner.rs": "use super::super::a::X;\n",
        },
    )
    graph = load_checker().module_graph(src)
    assert graph[("b",)] == {("b", "inner")}
    assert graph[("b", "inner")] == {("a",)}
    assert load_checker().cycles(graph) == [[("a",), ("b", "inner")]]
    assert run(src).returncode == 1


def test_a_child_using_its_parent_while_the_parent_uses_it_is_a_cycle(tmp_path):
    src = write_crate(
        tmp_path,
        {
            "a.rs": "pub struct Thing;\n",
            "b/mod.rs": "mod inner;\nfn f() { inner::g() }\n",
            "b/inner.rs": "use super::{h, Thing};\n",
        },
    )
    assert load_checker().cycles(load_checker().module_graph(src)) == [[("b",), ("b", "inner")]]


LAYERED_LIB = """\
//! A crate.
//!
//! <!-- layers -->
//! 1. leaves: `c`, then `a`;
//! 2. `b` on top.
//! <!-- /layers -->

mod a;
mod b;
mod c;
"""


def test_the_layer_list_is_read_lowest_first_in_order():
    assert load_checker().layers(LAYERED_LIB) == [[("c",), ("a",)], [("b",)]]
    assert load_checker().layers("mod a;\n") is None


def test_uses_down_the_declared_order_pass(tmp_path):
    src = write_crate(
        tmp_path,
        {
            "lib.rs": LAYERED_LIB,
            "a.rs": "use crate::c::C;\n",
            "b.rs": "use crate::a::Thing;\nuse crate::c::C;\n",
            "c.rs": "pub struct C;\n",
        },
    )
    result = run(src)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("files", "message"),
    [
        # No cycle: only the declared order catches it.
        (
            {"a.rs": "use crate::b::Top;\n", "b.rs": "", "c.rs": ""},
            "a (layer 1) uses b (layer 2): a higher layer",
        ),
        (
            {"a.rs": "", "b.rs": "", "c.rs": "use crate::a::Thing;\n"},
            "c (layer 1) uses a (layer 1): its own layer",
        ),
        (
            {"a.rs": "", "b.rs": "", "c.rs": "#[cfg(test)]\nmod tests {\n    use crate::b::Top;\n}\n"},
            "c (layer 1) uses b (layer 2)",
        ),
        ({"a.rs": "", "b.rs": "", "c.rs": "", "d.rs": ""}, "d is missing from the layers"),
        ({"a.rs": "", "b.rs": ""}, "c is listed in the layers but is no module"),
    ],
)
def test_a_use_up_the_order_or_a_stale_list_fails(tmp_path, files, message):
    src = write_crate(tmp_path, {"lib.rs": LAYERED_LIB, **files})
    result = run(src)
    assert result.returncode == 1
    assert message in result.stderr
    assert "module cycle" not in result.stderr


def test_the_engine_crate_declares_its_layers_and_keeps_them():
    lib_rs = load_checker().DEFAULT_SRC / "lib.rs"
    assert load_checker().layers(lib_rs.read_text(encoding="utf-8"))
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
