"""integrations.jsontext: the standard library's values, whichever library did the work."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import StrEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations import jsontext

# JSON values as the standard library reads them: any integer (beyond 64 bits too), finite floats, any text.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_reading_gives_what_the_standard_library_reads(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert jsontext.loads(text) == json.loads(text)
        assert jsontext.loads(text.encode()) == json.loads(text.encode())


@given(json_values)
def test_what_is_written_reads_back_as_the_same_value(value: object) -> None:
    assert json.loads(jsontext.dumps(value)) == value
    assert json.loads(jsontext.dumps_bytes(value)) == value


def test_integers_beyond_64_bits_stay_integers() -> None:
    big = 123456789012345678901234567890
    assert jsontext.loads(f'{{"id": {big}}}') == {"id": big}
    assert jsontext.loads(jsontext.dumps({"id": big})) == {"id": big}
    assert jsontext.loads(f"[{-big}]".encode()) == [-big]


def test_what_only_the_standard_library_reads_is_still_read() -> None:
    assert math.isnan(jsontext.loads('{"x": NaN}')["x"])
    assert jsontext.loads('"\\ud800"') == "\ud800"  # a lone surrogate


def test_what_neither_reads_is_refused_as_before() -> None:
    for text in ("{", "{'a': 1}", "", "[1,]"):
        with pytest.raises(json.JSONDecodeError):
            jsontext.loads(text)
    with pytest.raises(UnicodeDecodeError):
        jsontext.loads(b'"\xff"')


def test_what_only_the_standard_library_writes_is_written_as_it_writes_it() -> None:
    class Colour(StrEnum):
        RED = "red"

    assert json.loads(jsontext.dumps({1: "one", Colour.RED: [2**70]})) == {"1": "one", "red": [2**70]}
    assert jsontext.dumps("\ud800") == '"\\ud800"'  # escaped, so the text can be stored as UTF-8


def test_what_the_standard_library_refuses_is_still_refused() -> None:
    with pytest.raises(TypeError):
        jsontext.dumps({"at": datetime.now(UTC)})
    with pytest.raises(TypeError):
        jsontext.dumps({"x": object()})


def test_nan_is_written_as_null() -> None:
    assert jsontext.dumps([math.nan, math.inf]) == "[null,null]"
