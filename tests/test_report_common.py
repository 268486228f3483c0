"""The one Markdown-table helper every report and benchmark table goes through."""

from __future__ import annotations

import pytest

from edgemri.reports.common import markdown_table


def test_a_table_has_a_header_an_alignment_row_and_one_line_per_row() -> None:
    table = markdown_table(["model", "accuracy %", "clients"], [["kd", 92.1, 4], ["baseline", "90.9", 4]])
    assert table.splitlines() == ["| model | accuracy % | clients |", "|---|---:|---:|", "| kd | 92.1 | 4 |",
                                  "| baseline | 90.9 | 4 |"]


def test_alignment_is_one_letter_per_column() -> None:
    assert markdown_table(["a", "b", "c"], [], align="lrl").splitlines()[1] == "|---|---:|---|"
    for align in ("lr", "lrx"):
        with pytest.raises(ValueError, match="one of l/r per column"):
            markdown_table(["a", "b", "c"], [], align=align)


def test_a_pipe_or_a_line_break_in_a_cell_cannot_open_a_column_or_a_row() -> None:
    table = markdown_table(["name | kind", "note"], [["a|b", "two\nlines"]], align="ll")
    assert table.splitlines() == [r"| name \| kind | note |", "|---|---|", r"| a\|b | two lines |"]


@pytest.mark.parametrize("row", [["only one"], ["one", "two", "three"]])
def test_a_row_of_the_wrong_length_is_refused(row: list[str]) -> None:
    with pytest.raises(ValueError, match=f"a row has {len(row)} cells for 2 columns"):
        markdown_table(["a", "b"], [row])
