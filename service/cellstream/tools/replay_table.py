"""The CSV `cellstream replay` reads: which columns are readings, each row's stream, its position
in that stream and, with --time-col, its time."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

Time = float | datetime


class ReplayError(Exception):
    """The replay cannot start (file, columns, model, server); the message says what to change."""


@dataclass(frozen=True)
class Row:
    """One reading: its row in the file, its stream, and its position in that stream (from 0)."""

    index: int
    stream: str
    position: int
    values: tuple[float, ...]
    time: Time | None = None
    """The --time-col value (a number or a date), for the plot's x axis."""


@dataclass(frozen=True)
class Table:
    value_cols: tuple[str, ...]
    rows: tuple[Row, ...]
    streams: tuple[str, ...]
    """In order of first appearance."""
    time_col: str = ""


def read_table(
    path: Path, *, stream_col: str = "", value_cols: Sequence[str] = (), time_col: str = "", limit: int = 0
) -> Table:
    """Parse the CSV: the readings' columns (given, or every numeric one), each row's stream, position
    and time."""
    try:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            records = [r for r in reader if r]
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror}") from exc
    if not header:
        raise ReplayError(f"{path} is empty: the first line must name the columns")
    if limit > 0:
        records = records[:limit]
    for column in (stream_col, time_col):
        if column and column not in header:
            raise ReplayError(f"{path} has no column {column!r} (columns: {', '.join(header)})")
    missing = [c for c in value_cols if c not in header]
    if missing:
        raise ReplayError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})"
        )
    if not value_cols:
        value_cols = [
            c for i, c in enumerate(header) if c not in (stream_col, time_col) and _numeric(records, i)
        ]
        if not value_cols:
            raise ReplayError(f"{path}: no numeric column to send; name them with --value-cols")
    where = [header.index(c) for c in value_cols]
    stream_at = header.index(stream_col) if stream_col else -1
    for index, record in enumerate(records):
        if len(record) != len(header):
            raise ReplayError(f"{path} line {index + 2}: {len(record)} fields, the header has {len(header)}")
    times: list[Time | None] = [None] * len(records)
    if time_col:
        try:
            times[:] = parse_times(time_col, [record[header.index(time_col)] for record in records])
        except ValueError as exc:
            raise ReplayError(f"{path} {exc}") from None
    positions: dict[str, int] = {}
    rows = []
    for index, record in enumerate(records):
        stream = record[stream_at] if stream_col else path.stem
        values = []
        for column, at in zip(value_cols, where, strict=True):
            try:
                values.append(float(record[at]) if record[at].strip() else math.nan)
            except ValueError:
                raise ReplayError(
                    f"{path} line {index + 2}: column {column!r} holds {record[at]!r}, not a number"
                ) from None
        position = positions.get(stream, 0)
        positions[stream] = position + 1
        rows.append(Row(index, stream, position, tuple(values), times[index]))
    return Table(tuple(value_cols), tuple(rows), tuple(positions), time_col)


def _numeric(records: list[list[str]], column: int) -> bool:
    """Every non-empty cell parses as a float (an empty cell is a missing reading, sent as NaN)."""
    seen = False
    for record in records:
        cell = record[column].strip() if column < len(record) else ""
        if not cell:
            continue
        try:
            float(cell)
        except ValueError:
            return False
        seen = True
    return seen


def parse_times(column: str, cells: Sequence[str]) -> list[Time]:
    """The --time-col cells as numbers, or else as ISO dates or date-times; ValueError names the
    first cell that is neither."""
    try:
        return [float(cell) for cell in cells]
    except ValueError:
        pass
    times: list[Time] = []
    for line, cell in enumerate(cells, start=2):
        try:
            times.append(datetime.fromisoformat(cell.strip()))
        except ValueError:
            raise ValueError(
                f"line {line}: time column {column!r} holds {cell!r}: give every row a number or an ISO "
                "date (2001-01-06, 2001-01-06T12:00)"
            ) from None
    return times
