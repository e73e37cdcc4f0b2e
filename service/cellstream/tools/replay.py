"""`cellstream replay FILE.csv`: stream a CSV's rows to a server as readings, over one StepStream call.

Each row is one reading of one stream (the `--stream-col` value, or the file's name). Replies come
back in request order, so reply i answers row i. With `--seq` every reading carries its position
in its stream (seq = position + 1) and the replay first asks the server where each stream stands:
rows already applied are skipped, so an interrupted replay continues without applying anything
twice. Heavy dependencies (tqdm, matplotlib) are imported inside the command.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
    from cellstream.client import Client, StepReply

EXIT_ROW_ERRORS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PLOT_WIDTH_PX = 1200
PLOT_STREAM_HEIGHT_PX = 500
PLOT_DPI = 100
PLOT_MAX_STREAMS = 6


class ReplayError(Exception):
    """The replay cannot start (file, columns, model, server); the message says what to change."""


@dataclass(frozen=True)
class Row:
    """One reading: its row in the file, its stream, and its position in that stream (from 0)."""

    index: int
    stream: str
    position: int
    values: tuple[float, ...]


@dataclass(frozen=True)
class Table:
    value_cols: tuple[str, ...]
    rows: tuple[Row, ...]
    streams: tuple[str, ...]
    """In order of first appearance."""


@dataclass(frozen=True)
class Plan:
    """What this run sends: the rows the server has not applied yet, to which model."""

    table: Table
    rows: tuple[Row, ...]
    model: str
    output_size: int
    resumed: bool = False
    """Some rows were skipped as already applied: --out is appended to, not replaced."""


def register(commands: Any) -> None:
    """Add `replay` and `demo` to the top-level sub-commands (argparse's sub-parsers object)."""
    from cellstream.tools import demo_data  # noqa: PLC0415

    parser = commands.add_parser(
        "replay",
        help="stream a CSV's rows as readings over one StepStream call",
        description="Send each row of a CSV as one reading (one stream per --stream-col value, or one "
        "stream named after the file), write the answers as CSV and plot readings against "
        "predictions. Exit 0: every row answered; 1: some rows were refused (see the CSV's error "
        "column); 2: nothing was sent; 130: interrupted (rerun with --seq to continue).",
    )
    parser.add_argument("csv", type=Path, help="the CSV file; its first line names the columns")
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server (host:port)")
    parser.add_argument("--model", default="", help="the model to use (default: the server's default)")
    parser.add_argument("--stream-col", default="", help="column naming each row's stream")
    parser.add_argument(
        "--value-cols", default="", help="comma-separated reading columns (default: every numeric column)"
    )
    parser.add_argument("--rate", type=float, default=0.0, help="at most N rows per second (0 = no limit)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows of the file")
    parser.add_argument("--out", type=Path, default=None, help="write the answers here (CSV)")
    parser.add_argument("--plot", type=Path, default=None, help="draw readings vs predictions here (PNG)")
    parser.add_argument("--plot-last", type=int, default=0, help="plot only each stream's last N rows")
    parser.add_argument(
        "--seq",
        action="store_true",
        help="exactly once: number each reading and skip the rows the server has already applied",
    )
    parser.add_argument("--reset", action="store_true", help="start each stream over at its first row")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for each lookup call")
    parser.set_defaults(func=_run)
    demo_data.register(commands)


def _run(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    from cellstream.client import Client  # noqa: PLC0415

    if args.seq and args.reset:
        print("cellstream replay: --seq and --reset exclude each other", file=sys.stderr)
        return EXIT_USAGE
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Said before sending, not after a long replay.
        print("cellstream replay: --plot needs matplotlib: pip install 'cellstream[plot]'", file=sys.stderr)
        return EXIT_USAGE
    value_cols = tuple(c.strip() for c in args.value_cols.split(",") if c.strip())
    client = Client(args.address, timeout=args.timeout)
    try:
        try:
            table = read_table(args.csv, stream_col=args.stream_col, value_cols=value_cols, limit=args.limit)
            model, output_size = _model_for(client, args.model, len(table.value_cols))
            done = _applied_steps(client, table.streams, model) if args.seq else {}
        except ReplayError as exc:
            print(f"cellstream replay: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except grpc.RpcError as exc:
            print(f"cellstream replay: {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_USAGE
        rows = tuple(r for r in table.rows if r.position >= done.get(r.stream, 0))
        skipped = len(table.rows) - len(rows)
        if skipped:
            print(f"resuming: {skipped} rows already applied on the server are skipped", file=sys.stderr)
        return _replay(args, client, Plan(table, rows, model, output_size, resumed=skipped > 0))
    finally:
        client.close()


def read_table(path: Path, *, stream_col: str = "", value_cols: Sequence[str] = (), limit: int = 0) -> Table:
    """Parse the CSV: the readings' columns (given, or every numeric one), each row's stream and position."""
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
    if stream_col and stream_col not in header:
        raise ReplayError(f"{path} has no column {stream_col!r} (columns: {', '.join(header)})")
    missing = [c for c in value_cols if c not in header]
    if missing:
        raise ReplayError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})"
        )
    if not value_cols:
        value_cols = [c for i, c in enumerate(header) if c != stream_col and _numeric(records, i)]
        if not value_cols:
            raise ReplayError(f"{path}: no numeric column to send; name them with --value-cols")
    where = [header.index(c) for c in value_cols]
    stream_at = header.index(stream_col) if stream_col else -1
    positions: dict[str, int] = {}
    rows = []
    for index, record in enumerate(records):
        if len(record) != len(header):
            raise ReplayError(f"{path} line {index + 2}: {len(record)} fields, the header has {len(header)}")
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
        rows.append(Row(index, stream, position, tuple(values)))
    return Table(tuple(value_cols), tuple(rows), tuple(positions))


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


def _model_for(client: Client, requested: str, columns: int) -> tuple[str, int]:
    """The model's name and answer size; refuses a reading size the model would refuse row by row."""
    models = client.list_models()
    if requested:
        found = [m for m in models if m.name == requested]
        if not found:
            raise ReplayError(
                f"the server has no model {requested!r} (models: {', '.join(m.name for m in models)})"
            )
    else:
        found = [m for m in models if m.is_default]
        if not found:
            raise ReplayError("the server has no default model: name one with --model")
    model = found[0]
    if model.input_size != columns:
        raise ReplayError(
            f"each row gives {columns} value(s), model {model.name!r} expects {model.input_size}: "
            "choose the columns with --value-cols, or another model with --model"
        )
    return model.name, int(model.output_size)


def _applied_steps(client: Client, streams: Sequence[str], model: str) -> dict[str, int]:
    """Each stream's step on the server (NOT_FOUND: 0), so a resumed replay skips applied rows."""
    import grpc  # noqa: PLC0415

    steps = {}
    for stream in streams:
        try:
            state = client.get_state(stream)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            steps[stream] = 0
            continue
        if state.model != model:
            raise ReplayError(
                f"stream {stream!r} is bound to model {state.model!r}, not {model!r}: delete it "
                "(DeleteStream) or replay with --model " + state.model
            )
        steps[stream] = state.step
    return steps


def _requests(args: argparse.Namespace, rows: Sequence[Row], model: str) -> Iterator[pb.StepRequest]:
    """The StepRequests, paced by --rate (this runs in gRPC's sending thread)."""
    from cellstream.client import step_request  # noqa: PLC0415

    start = time.monotonic()
    for i, row in enumerate(rows):
        if args.rate > 0:
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield step_request(
            row.stream,
            row.values,
            model=model,
            seq=row.position + 1 if args.seq else 0,
            reset=args.reset and row.position == 0,
            omit_state=True,
            request_id=row.index + 1,
        )


def _replay(args: argparse.Namespace, client: Client, plan: Plan) -> int:
    import grpc  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    table, rows, model = plan.table, plan.rows, plan.model
    header = [
        "stream",
        "row",
        "step",
        *table.value_cols,
        *(f"output_{i}" for i in range(plan.output_size)),
        "error",
    ]
    out, writer = _open_out(args.out, header, append=plan.resumed)
    results: list[tuple[Row, StepReply]] = []
    errors = 0
    started = time.monotonic()
    # No deadline on the call itself: a rate-limited replay of a long file may take hours.
    client.timeout = None
    # disable=None: the bar shows on a terminal and stays out of logs and pipes.
    bar = tqdm(total=len(rows), unit="row", disable=True if args.no_progress else None, file=sys.stderr)
    bar.set_postfix(errors=0, refresh=False)
    try:
        for row, reply in zip(rows, client.step_stream(_requests(args, rows, model)), strict=False):
            results.append((row, reply))
            if reply.error is not None:
                errors += 1
                bar.set_postfix(errors=errors, refresh=False)
            if writer is not None:
                writer.writerow(_csv_row(row, reply, plan.output_size))
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        print(
            f"interrupted after {len(results)} of {len(rows)} rows: run again with --seq to continue "
            "where the server stopped",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except grpc.RpcError as exc:
        bar.close()
        print(
            f"cellstream replay: the call ended after {len(results)} of {len(rows)} rows: "
            f"{exc.code().name}: {exc.details()} (rerun with --seq to continue)",
            file=sys.stderr,
        )
        return EXIT_ROW_ERRORS
    finally:
        bar.close()
        if out is not None:
            out.close()
    elapsed = max(time.monotonic() - started, 1e-9)
    print(
        f"replayed {len(results)} rows of {len(table.streams)} stream(s) with model {model!r} in "
        f"{elapsed:.2f} s ({len(results) / elapsed:.0f} rows/s), {errors} refused",
        file=sys.stderr,
    )
    if args.plot is not None:
        plot(results, table.value_cols[0], args.plot, model=model, last=args.plot_last)
    return EXIT_ROW_ERRORS if errors else 0


def _open_out(path: Path | None, header: list[str], *, append: bool) -> tuple[TextIO | None, Any]:
    """The answers' CSV, line-buffered so an interrupted replay leaves every answer it received.

    A resumed replay appends to the file of the run it continues (when it has the same columns),
    so running the same command again completes the same file.
    """
    if path is None:
        return None, None
    if append and path.is_file():
        with path.open(newline="") as existing:
            append = next(csv.reader(existing), None) == header
    else:
        append = False
    out = path.open("a" if append else "w", newline="", buffering=1)
    writer = csv.writer(out, lineterminator="\n")
    if not append:
        writer.writerow(header)
    return out, writer


def _csv_row(row: Row, reply: StepReply, output_size: int) -> list[object]:
    if reply.error is not None:
        code, message = reply.error
        return [row.stream, row.index, "", *row.values, *[""] * output_size, f"{code.name}: {message}"]
    return [row.stream, row.index, reply.step, *row.values, *(f"{v:.9g}" for v in reply.output), ""]


def plot(
    results: Sequence[tuple[Row, StepReply]], value_col: str, path: Path, *, model: str = "", last: int = 0
) -> None:
    """Readings against predictions per stream: the answer at row t is drawn at row t + 1.

    The top panel assumes answer[0] forecasts the first value column's next reading; the bottom
    one shows |reading - prediction| and the answer's other values (e.g. an expected error), also
    shifted by one row. At most PLOT_MAX_STREAMS streams are drawn; the image is always
    PLOT_WIDTH_PX wide and PLOT_STREAM_HEIGHT_PX high per stream drawn.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by_stream: dict[str, list[tuple[Row, StepReply]]] = {}
    for row, reply in results:
        if reply.error is None:
            by_stream.setdefault(row.stream, []).append((row, reply))
    streams = list(by_stream)[:PLOT_MAX_STREAMS] or ["(no rows)"]
    size = (PLOT_WIDTH_PX / PLOT_DPI, PLOT_STREAM_HEIGHT_PX * len(streams) / PLOT_DPI)
    figure = plt.figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    grid = figure.add_gridspec(2 * len(streams), 1, height_ratios=[3, 1] * len(streams))
    for k, stream in enumerate(streams):
        top = figure.add_subplot(grid[2 * k])
        bottom = figure.add_subplot(grid[2 * k + 1], sharex=top)
        pairs = by_stream.get(stream, [])
        pairs = pairs[-last:] if last > 0 else pairs
        readings = [row.values[0] for row, _ in pairs]
        top.plot([r.step for _, r in pairs], readings, color="0.25", lw=1.0, label=f"reading ({value_col})")
        # A prediction pairs with the reading it forecast only across consecutive steps.
        shifted = [
            (b.step, b_row.values[0], a.output)
            for (_, a), (b_row, b) in itertools.pairwise(pairs)
            if b.step == a.step + 1
        ]
        if shifted:
            steps = [step for step, _, _ in shifted]
            predicted = [float(answer[0]) for _, _, answer in shifted]
            label = "prediction (answer[0] one step earlier)"
            top.plot(steps, predicted, color="tab:orange", lw=1.0, label=label)
            residual = [abs(v - p) for (_, v, _), p in zip(shifted, predicted, strict=True)]
            bottom.plot(steps, residual, color="tab:red", lw=0.8, label="|reading - prediction|")
            for j in range(1, len(shifted[0][2])):
                extra = [float(answer[j]) for _, _, answer in shifted]
                bottom.plot(steps, extra, lw=1.0, label=f"answer[{j}] one step earlier")
            bottom.legend(loc="upper left", fontsize="small")
        top.set_title(f"stream {stream}" + (f", model {model}" if model else ""))
        top.legend(loc="upper left", fontsize="small")
        bottom.set_xlabel("step")
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
