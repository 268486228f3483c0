"""The one way to read untrusted JSON: strict parsing, then a schema of named checks, one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgemri.core.errors import EdgemriError
from edgemri.core.untrusted import (
    SHA256,
    Check,
    check_record,
    check_value,
    list_of,
    mapping_of,
    number,
    parse_json,
    read_json,
    text,
)


class BadInput(EdgemriError):
    pass


@pytest.mark.parametrize(("raw", "message"), [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ("[" * 100_000, "not valid JSON"),
    (b"\xff", "is not UTF-8 text"),
])
def test_what_pythons_json_accepts_silently_is_refused(raw: str | bytes, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        parse_json(raw, "f.json", BadInput)


def test_nonfinite_numbers_are_read_only_when_asked_for() -> None:
    assert math.isnan(parse_json('{"a": NaN}', "f.json", BadInput, nonfinite=True)["a"])


def test_a_file_over_its_bound_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text('{"a": 1}')
    with pytest.raises(BadInput, match="8 bytes is over the 4-byte limit"):
        read_json(tmp_path / "f.json", BadInput, max_bytes=4)
    with pytest.raises(BadInput, match="missing.json not found"):
        read_json(tmp_path / "missing.json", BadInput)


@pytest.mark.parametrize(("check", "good", "bad", "allowed"), [
    (number(0, 1, open_low=True), [1, 0.5], [0, 1.5, True, "0.5", math.nan], "a finite number in (0, 1]"),
    (number(0, open_low=True), [1e-9], [0, math.inf], "a finite number > 0"),
    (number(0, 2**31 - 1, integer=True), [0, 2**31 - 1], [2**31, 1.0], "an integer in [0, 2147483647]"),
    (list_of(SHA256, 1, 2), [["0" * 64]], [[], ["0" * 64] * 3, ["x"]], "a list of 1 to 2 entries, each a SHA-256"),
    (mapping_of(text(3), number()), [{"abc": 1}], [{"abcd": 1}, {"a": "1"}, []], "keys printable text of at most 3"),
])
def test_each_check_says_what_it_allows(check: Check, good: list, bad: list, allowed: str) -> None:
    assert all(check(v) for v in good) and not any(check(v) for v in bad)
    assert allowed in check.allowed


def test_an_error_names_the_file_the_key_and_the_allowed_values() -> None:
    schema = {"path": text(10), "rate": number(0, 1)}
    with pytest.raises(BadInput, match=r"^f\.json: key 'files\[2\]\.rate' has value '7'; allowed: a finite number "
                                       r"in \[0, 1\]$"):
        check_record({"path": "a", "rate": 7}, schema, "f.json", BadInput, within="files[2]")
    with pytest.raises(BadInput, match=r"^f\.json: files\[2\] has the wrong keys \(missing: rate; unexpected: x\)$"):
        check_record({"path": "a", "x": 1}, schema, "f.json", BadInput, within="files[2]")
    with pytest.raises(BadInput, match=r"^client name has value '\.\./x'; allowed: printable text"):
        check_value("../x", text(3), "client name", BadInput)
