"""Names the Python layer shares with the engine agree with the engine's one table.

The engine defines handler kinds, close codes, refusal statuses, the keys of
``stats()``, the drain batch and the default bind once (``_core`` exports them);
what Python must spell out for a type checker (the enum members, the ``Stats``
TypedDict) and what documents them (``stats()``'s docstring, docs/api.md) is
held to those tables here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import warpsocket
from warpsocket import _core, cli, worker
from warpsocket.codes import CloseCode, HandlerKind, RefusalStatus
from warpsocket.stats import Stats

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
FIELD_NAMES = [name for name, *_ in _core.STATS_FIELDS]


@pytest.mark.parametrize(
    ("enum", "table"),
    [
        (HandlerKind, _core.HANDLER_KINDS),
        (CloseCode, _core.CLOSE_CODES),
        (RefusalStatus, _core.REFUSAL_STATUSES),
    ],
)
def test_enums_are_the_engine_tables(enum, table):
    assert {member.name: member.value for member in enum} == dict(table)
    assert len(dict(table)) == len(table), "a name is listed twice"


def test_handler_kinds_number_the_histograms():
    assert [kind.value for kind in HandlerKind] == list(range(len(HandlerKind)))
    timings = _core.HandlerTimings([0.1])
    for kind in HandlerKind:
        timings.record(kind, 0.0, 0.0)
    with pytest.raises(ValueError):
        timings.record(len(HandlerKind), 0.0, 0.0)
    wait, _ran = timings.snapshot()
    assert len(wait[0]) == len(HandlerKind)


def test_stats_typeddict_has_the_engine_keys():
    assert set(Stats.__required_keys__) | set(Stats.__optional_keys__) == set(FIELD_NAMES) | {"workers"}
    # Absent outside a cluster: the one key counters() may leave out.
    assert Stats.__optional_keys__ == frozenset({"redis_connected"})
    counters = _core.counters()
    assert list(counters) == [name for name in FIELD_NAMES if name in counters]
    assert set(FIELD_NAMES) - set(counters) <= {"redis_connected"}


def test_stats_fields_are_well_formed():
    for name, kind, label, help_text in _core.STATS_FIELDS:
        assert re.fullmatch(r"[a-z_]+", name), name
        assert kind in ("gauge", "counter"), name
        assert label is None or kind == "counter", name
        assert help_text.endswith("."), name
    assert len(set(FIELD_NAMES)) == len(FIELD_NAMES)


def _keys_in(text: str) -> set[str]:
    return set(re.findall(r"`{1,2}([a-z_]+)`{1,2}", text))


def test_stats_docstring_names_every_key():
    assert set(FIELD_NAMES) | {"workers"} <= _keys_in(warpsocket.stats.__doc__ or "")


def test_api_reference_names_every_stats_key():
    text = API_DOC.read_text(encoding="utf-8")
    section = text[text.index('<a id="stats"></a>') :]
    section = section[: section.index("<a id=", len('<a id="stats"></a>'))]
    assert set(FIELD_NAMES) | {"workers"} <= _keys_in(section)


def test_drain_batch_and_default_bind_come_from_the_engine():
    assert worker.DRAIN_BATCH == _core.DRAIN_BATCH
    bind = next(a for a in cli.build_parser()._actions if "--bind" in a.option_strings)
    assert _core.DEFAULT_BIND in (bind.help or "")
