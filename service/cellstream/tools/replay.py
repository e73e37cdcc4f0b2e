"""`cellstream replay FILE.csv`: stream a CSV's rows to a server as readings, over one StepStream call.

Each row is one reading of one stream (the `--stream-col` value, or the file's name). Replies come
back in request order, so reply i answers row i. With `--seq` every reading carries its position
in its stream (seq = position + 1) and the replay first asks the server where each stream stands:
rows already applied are skipped, so an interrupted replay continues without applying anything
twice. Heavy dependencies (tqdm, matplotlib) are imported inside the command; the plot itself is
drawn by `replay_plot`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cellstream.tools.client_options import add_client_arguments, call_failed, client_from
from cellstream.tools.replay_plot import Labels, answered_by, answers_in, plot
from cellstream.tools.replay_table import ReplayError, Row, Table, read_table

if TYPE_CHECKING:
    from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
    from cellstream.client import Client, StepReply

EXIT_ROW_ERRORS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
        "forecasts. Exit 0: every row answered; 1: some rows were refused (see the CSV's error "
        "column); 2: nothing was sent; 130: interrupted (rerun with --seq to continue).",
    )
    parser.add_argument("csv", type=Path, help="the CSV file; its first line names the columns")
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server (host:port)")
    add_client_arguments(parser)
    parser.add_argument("--model", default="", help="the model to use (default: the server's default)")
    parser.add_argument("--stream-col", default="", help="column naming each row's stream")
    parser.add_argument(
        "--value-cols", default="", help="comma-separated reading columns (default: every numeric column)"
    )
    parser.add_argument("--rate", type=float, default=0.0, help="at most N rows per second (0 = no limit)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows of the file")
    parser.add_argument("--out", type=Path, default=None, help="write the answers here (CSV)")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="draw readings vs forecasts here (PNG, or SVG by the suffix), reading answer[0] as the "
        "forecast of the next reading and answer[1] as its expected error; a resumed replay plots "
        "its whole --out file",
    )
    parser.add_argument("--plot-last", type=int, default=0, help="plot only each stream's last N rows")
    parser.add_argument(
        "--time-col", default="", help="column of each row's time (numbers or ISO dates): the plot's x axis"
    )
    parser.add_argument(
        "--unit",
        default="",
        help="unit of the readings, for the plot (default: from a header like 'co2 (ppm)')",
    )
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

    if args.seq and args.reset:
        print("cellstream replay: --seq and --reset exclude each other", file=sys.stderr)
        return EXIT_USAGE
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Said before sending, not after a long replay.
        print("cellstream replay: --plot needs matplotlib: pip install 'cellstream[plot]'", file=sys.stderr)
        return EXIT_USAGE
    value_cols = tuple(c.strip() for c in args.value_cols.split(",") if c.strip())
    try:
        client = client_from(args)
    except ValueError as exc:
        print(f"cellstream replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            table = read_table(
                args.csv,
                stream_col=args.stream_col,
                value_cols=value_cols,
                time_col=args.time_col,
                limit=args.limit,
            )
            model, output_size = _model_for(client, args.model, len(table.value_cols))
            done = _applied_steps(client, table.streams, model) if args.seq else {}
        except ReplayError as exc:
            print(f"cellstream replay: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except grpc.RpcError as exc:
            print(f"cellstream replay: {call_failed(args.address, exc)}", file=sys.stderr)
            return EXIT_USAGE
        rows = tuple(r for r in table.rows if r.position >= done.get(r.stream, 0))
        skipped = len(table.rows) - len(rows)
        if skipped:
            print(f"resuming: {skipped} rows already applied on the server are skipped", file=sys.stderr)
        return _replay(args, client, Plan(table, rows, model, output_size, resumed=skipped > 0))
    finally:
        client.close()


def _model_for(client: Client, requested: str, columns: int) -> tuple[str, int]:
    """The model's name and answer size; refuses a reading size the model would refuse row by row."""
    # One entry per loaded version: the current one first, each name once in messages.
    models = sorted(client.list_models(), key=lambda m: not m.current)
    if requested:
        found = [m for m in models if m.name == requested]
        if not found:
            names = sorted({m.name for m in models})
            raise ReplayError(f"the server has no model {requested!r} (models: {', '.join(names)})")
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
    out, writer, appended = _open_out(args.out, header, append=plan.resumed)
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
        _plot(args, plan, results, appended=appended)
    return EXIT_ROW_ERRORS if errors else 0


def _plot(
    args: argparse.Namespace, plan: Plan, results: Sequence[tuple[Row, StepReply]], *, appended: bool
) -> None:
    """Draw every answer known: a resumed replay that appended to --out draws that whole file, so
    the rows applied by earlier runs are on the plot too; where they are not, the note says why."""
    table = plan.table
    earlier = len(table.rows) - len(plan.rows)
    if appended:
        answered = answers_in(args.out, table)
    else:
        answered = [
            answered_by(row, reply.step, reply.output) for row, reply in results if reply.error is None
        ]
    if earlier and not appended:
        where = f"were not in {args.out}" if args.out else "are in no --out file of this run"
        why = f"the {earlier} rows applied by an earlier run {where}"
        if not answered:
            print(
                f"cellstream replay: no plot written: {why}; rerun with that run's --out FILE to plot it",
                file=sys.stderr,
            )
            return
        print(f"cellstream replay: the plot shows only this run's rows: {why}", file=sys.stderr)
    if not answered:
        print("cellstream replay: no plot written: no row was answered", file=sys.stderr)
        return
    labels = Labels(table.value_cols[0], table.time_col, args.unit)
    plot(answered, labels, args.plot, model=plan.model, last=args.plot_last)


def _open_out(path: Path | None, header: list[str], *, append: bool) -> tuple[TextIO | None, Any, bool]:
    """The answers' CSV, line-buffered so an interrupted replay leaves every answer it received,
    and whether it was appended to.

    A resumed replay appends to the file of the run it continues (when it has the same columns),
    so running the same command again completes the same file.
    """
    if path is None:
        return None, None, False
    if append and path.is_file():
        with path.open(newline="") as existing:
            append = next(csv.reader(existing), None) == header
    else:
        append = False
    out = path.open("a" if append else "w", newline="", buffering=1)
    writer = csv.writer(out, lineterminator="\n")
    if not append:
        writer.writerow(header)
    return out, writer, append


def _csv_row(row: Row, reply: StepReply, output_size: int) -> list[object]:
    if reply.error is not None:
        code, message = reply.error
        return [row.stream, row.index, "", *row.values, *[""] * output_size, f"{code.name}: {message}"]
    return [row.stream, row.index, reply.step, *row.values, *(f"{v:.9g}" for v in reply.output), ""]
