"""`cellstream replay`: a CSV streamed over one StepStream call, its answers, its plot, and resuming.

Against a real server (the bundled repository, which holds the demo model), through the CLI as a
user runs it; answers are compared with onnxruntime stepping the model directly (test_demo).
"""

from __future__ import annotations

import csv
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import grpc
import numpy as np
import pytest

from support import MODELS, RunningServer, start_server, wait_for
from test_demo import DEMO, readings, step_through

ROWS_PER_STREAM = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("replay-server"))
    yield running
    assert running.stop() == 0, running.log()


def replay(server: RunningServer, csv_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cellstream", "replay", str(csv_path), "--address", server.address]
    return subprocess.run(
        [*command, "--no-progress", *args], capture_output=True, text=True, timeout=120, check=False
    )


def two_streams(path: Path, prefix: str) -> Path:
    """The first 600 weeks as two interleaved stations: rows alternate `<prefix>-a`, `<prefix>-b`."""
    series = readings()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["station", "co2"])
        for i in range(ROWS_PER_STREAM):
            writer.writerow([f"{prefix}-a", f"{series[i]:.2f}"])
            writer.writerow([f"{prefix}-b", f"{series[ROWS_PER_STREAM + i]:.2f}"])
    return path


def answers(path: Path) -> dict[int, list[str]]:
    """Row index -> [step, output_0, output_1] from a replay's --out CSV."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["error"] == "" for row in rows)
    assert len({row["row"] for row in rows}) == len(rows), "a row was answered twice"
    return {int(row["row"]): [row["step"], row["output_0"], row["output_1"]] for row in rows}


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def svg_texts(path: Path) -> set[str]:
    """Every text a plot saved as SVG shows: titles, axis labels, legend entries, tick labels."""
    root = ElementTree.parse(path).getroot()
    return {"".join(e.itertext()).strip() for e in root.iter("{http://www.w3.org/2000/svg}text")}


def needs_matplotlib() -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib: pip install 'cellstream[plot]'")


@pytest.fixture(scope="module")
def reference(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[str]]:
    """One uninterrupted replay of the two-station CSV: what every resumed replay must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    result = replay(
        server,
        two_streams(tmp / "ref.csv", "ref"),
        "--stream-col",
        "station",
        "--model",
        "demo",
        "--out",
        str(tmp / "ref-out.csv"),
    )
    assert result.returncode == 0, result.stderr
    return answers(tmp / "ref-out.csv")


def final_states(server: RunningServer, prefix: str) -> dict[str, tuple[int, np.ndarray]]:
    with server.client() as client:
        states = {s: client.get_state(f"{prefix}-{s}") for s in ("a", "b")}
    return {s: (st.step, np.concatenate([st.state["h"], st.state["mem"]])) for s, st in states.items()}


def test_replay_of_the_demo_csv_writes_every_answer(server: RunningServer, tmp_path: Path) -> None:
    csv_path = tmp_path / "mauna-loa.csv"
    csv_path.write_bytes((DEMO / "co2_weekly.csv").read_bytes())
    result = replay(server, csv_path, "--model", "demo", "--out", str(tmp_path / "out.csv"))
    assert result.returncode == 0, result.stderr
    assert "replayed 2284 rows of 1 stream(s) with model 'demo'" in result.stderr
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["stream", "row", "step", "co2", "output_0", "output_1", "error"]
    assert {row["stream"] for row in rows} == {"mauna-loa"}  # one stream, named after the file
    assert [int(row["row"]) for row in rows] == list(range(2284))
    assert [int(row["step"]) for row in rows] == list(range(1, 2285))
    got = np.array([[float(row["output_0"]), float(row["output_1"])] for row in rows])
    np.testing.assert_allclose(got, step_through(readings().astype(np.float64)), atol=1e-3)


def test_plot_has_one_panel_pair_per_stream(server: RunningServer, tmp_path: Path) -> None:
    needs_matplotlib()
    csv_path = two_streams(tmp_path / "plotted.csv", "plot")
    plot = tmp_path / "plot.png"
    result = replay(server, csv_path, "--stream-col", "station", "--model", "demo", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert png_size(plot) == (1200, 2 * 500)


SERIES = {"reading", "forecast made one step earlier", "actual error |reading - forecast|", "expected error"}


def test_plot_axes_carry_the_time_column_and_the_unit_given(server: RunningServer, tmp_path: Path) -> None:
    needs_matplotlib()
    csv_path = tmp_path / "co2.csv"
    csv_path.write_bytes((DEMO / "co2_weekly.csv").read_bytes())
    plot = tmp_path / "plot.svg"
    args = ["--time-col", "date", "--unit", "ppm", "--plot-last", "104", "--plot", str(plot)]
    result = replay(server, csv_path, "--model", "demo", *args)
    assert result.returncode == 0, result.stderr
    texts = svg_texts(plot)
    assert {"date", "co2 (ppm)", "error (ppm)", "stream co2, model demo"} | SERIES <= texts
    assert any(re.fullmatch(r"200[01]-\d\d", t) for t in texts), texts  # dated ticks: 2000-2001
    assert not [t for t in texts if "answer[" in t or "prediction" in t]


def test_plot_takes_units_from_the_csv_header(server: RunningServer, tmp_path: Path) -> None:
    needs_matplotlib()
    csv_path = tmp_path / "tank.csv"
    series = readings()[:200]
    csv_path.write_text("t (s),level [m]\n" + "".join(f"{i * 0.5},{v:.2f}\n" for i, v in enumerate(series)))
    plot = tmp_path / "plot.svg"
    result = replay(server, csv_path, "--model", "demo", "--time-col", "t (s)", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "replayed 200 rows" in result.stderr  # the time column is not sent as a reading
    assert {"t (s)", "level (m)", "error (m)"} | SERIES <= svg_texts(plot)

    without = replay(server, csv_path, "--model", "demo", "--value-cols", "level [m]", "--plot", str(plot))
    assert without.returncode == 0, without.stderr
    assert {"step", "level (m)", "error (m)"} <= svg_texts(plot)


def test_a_time_column_that_is_neither_numbers_nor_dates_is_refused_before_sending(
    server: RunningServer, tmp_path: Path
) -> None:
    csv_path = tmp_path / "when.csv"
    csv_path.write_text("when,co2\n2001-01-06,370.1\nyesterday,370.4\n")
    result = replay(server, csv_path, "--model", "demo", "--time-col", "when")
    assert result.returncode == 2
    assert "line 3: time column 'when' holds 'yesterday'" in result.stderr
    with server.client() as client, pytest.raises(grpc.RpcError) as info:
        client.get_state("when")  # the stream named after the file was never created
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_seq_replay_plots_the_whole_out_file_even_with_nothing_left_to_apply(
    server: RunningServer, tmp_path: Path
) -> None:
    needs_matplotlib()
    csv_path = two_streams(tmp_path / "again.csv", "again")
    common = ["--stream-col", "station", "--model", "demo", "--seq"]
    whole = replay(
        server, csv_path, *common, "--out", str(tmp_path / "whole.csv"), "--plot", str(tmp_path / "whole.png")
    )
    assert whole.returncode == 0, whole.stderr
    with server.client() as client:
        for stream in ("again-a", "again-b"):
            assert client.delete(stream)

    # The same streams again, in two runs: the second plots what both applied.
    out = str(tmp_path / "out.csv")
    part = replay(server, csv_path, *common, "--limit", "251", "--out", out)
    assert part.returncode == 0, part.stderr
    rest = replay(server, csv_path, *common, "--out", out, "--plot", str(tmp_path / "rest.png"))
    assert rest.returncode == 0, rest.stderr
    assert (tmp_path / "rest.png").read_bytes() == (tmp_path / "whole.png").read_bytes()

    nothing = replay(server, csv_path, *common, "--out", out, "--plot", str(tmp_path / "nothing.png"))
    assert nothing.returncode == 0, nothing.stderr
    assert "replayed 0 rows" in nothing.stderr
    assert (tmp_path / "nothing.png").read_bytes() == (tmp_path / "whole.png").read_bytes()


def test_a_seq_replay_without_the_earlier_out_file_says_why_it_draws_no_plot(
    server: RunningServer, tmp_path: Path
) -> None:
    needs_matplotlib()
    csv_path = two_streams(tmp_path / "unplotted.csv", "unplotted")
    common = ["--stream-col", "station", "--model", "demo", "--seq"]
    assert replay(server, csv_path, *common).returncode == 0
    plot = tmp_path / "plot.png"
    again = replay(server, csv_path, *common, "--plot", str(plot))
    assert again.returncode == 0, again.stderr
    assert "no plot written: the 600 rows applied by an earlier run are in no --out file" in again.stderr
    assert "rerun with that run's --out FILE" in again.stderr
    assert not plot.exists()


def test_seq_resume_after_a_partial_replay_applies_nothing_twice(
    server: RunningServer, tmp_path: Path, reference: dict[int, list[str]]
) -> None:
    csv_path = two_streams(tmp_path / "resumed.csv", "resumed")
    common = ["--stream-col", "station", "--model", "demo", "--seq"]
    first = replay(server, csv_path, *common, "--limit", "251", "--out", str(tmp_path / "part1.csv"))
    assert first.returncode == 0, first.stderr
    assert {s: step for s, (step, _) in final_states(server, "resumed").items()} == {"a": 126, "b": 125}

    second = replay(server, csv_path, *common, "--out", str(tmp_path / "part2.csv"))
    assert second.returncode == 0, second.stderr
    assert "resuming: 251 rows already applied on the server are skipped" in second.stderr
    part1, part2 = answers(tmp_path / "part1.csv"), answers(tmp_path / "part2.csv")
    assert sorted(part1) == list(range(251)) and sorted(part2) == list(range(251, 600))
    assert {**part1, **part2} == reference

    again = replay(server, csv_path, *common)
    assert again.returncode == 0, again.stderr
    assert "replayed 0 rows" in again.stderr
    states = final_states(server, "resumed")
    assert states["a"][0] == states["b"][0] == ROWS_PER_STREAM


def test_interrupted_replay_continues_where_the_server_stopped(
    server: RunningServer, tmp_path: Path, reference: dict[int, list[str]]
) -> None:
    csv_path = two_streams(tmp_path / "cut.csv", "cut")
    common = ["--stream-col", "station", "--model", "demo", "--seq"]
    part1 = tmp_path / "part1.csv"
    command = [sys.executable, "-m", "cellstream", "replay", str(csv_path), "--address", server.address]
    process = subprocess.Popen(
        [*command, "--no-progress", *common, "--rate", "300", "--out", str(part1)],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: part1.exists() and part1.read_text().count("\n") > 60, timeout=30)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "run again with --seq" in stderr
    done = answers(part1)
    assert 60 <= len(done) < 600

    # The same command again: it skips what the server applied and appends to the same file.
    resumed = replay(server, csv_path, *common, "--out", str(part1))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    everything = answers(part1)  # also asserts that no row was answered twice
    assert everything.items() <= reference.items()  # each answer as if never interrupted
    # A reply in flight at the interrupt may be lost, but its reading was applied exactly once.
    assert len(everything) >= 598
    steps = {s: step for s, (step, _) in final_states(server, "cut").items()}
    assert steps == {"a": ROWS_PER_STREAM, "b": ROWS_PER_STREAM}
    for (_, cut), (_, ref) in zip(
        final_states(server, "cut").values(), final_states(server, "ref").values(), strict=True
    ):
        np.testing.assert_array_equal(cut, ref)


def test_rate_limits_rows_per_second(server: RunningServer, tmp_path: Path) -> None:
    csv_path = tmp_path / "paced.csv"
    csv_path.write_text("co2\n" + "".join(f"{330 + i / 10:.1f}\n" for i in range(40)))
    started = time.monotonic()
    result = replay(server, csv_path, "--model", "demo", "--rate", "80")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 39 / 80


def test_refused_rows_are_written_with_their_error(server: RunningServer, tmp_path: Path) -> None:
    csv_path = tmp_path / "gaps.csv"
    csv_path.write_text("date,co2\n2001-01-06,370.1\n2001-01-13,\n2001-01-20,370.4\n")
    out = tmp_path / "out.csv"
    result = replay(server, csv_path, "--model", "demo", "--out", str(out))
    assert result.returncode == 1
    assert "1 refused" in result.stderr
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["1", "", "2"]
    assert rows[1]["error"].startswith("INVALID_ARGUMENT:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gru"], "each row gives 1 value(s), model 'gru' expects 8"),
        (["--model", "nope"], "the server has no model 'nope' (models: demo, gru, gru2, lstm)"),
        (["--time-col", "day"], "has no column 'day'"),
        (["--value-cols", "ppm"], "has no column 'ppm'"),
        (["--stream-col", "site"], "has no column 'site'"),
        (["--seq", "--reset"], "--seq and --reset exclude each other"),
    ],
)
def test_a_replay_that_cannot_start_exits_2_and_says_why(
    server: RunningServer, tmp_path: Path, args: list[str], message: str
) -> None:
    result = replay(server, DEMO / "co2_weekly.csv", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_the_model_list_names_each_model_once_while_two_versions_are_loaded(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "gru" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "gru" / "model.onnx", repo / "gru" / "1" / "model.onnx")
    shutil.copytree(DEMO, repo / "demo")
    running = start_server(tmp_path / "run", "--model-poll-interval", "0.05", models=repo)
    try:
        with running.client() as client:
            client.step("stays-on-1", np.zeros(8, np.float32), model="gru")
            staging = repo / "gru" / ".2"
            staging.mkdir()
            shutil.copy(MODELS / "gru" / "model.onnx", staging / "model.onnx")
            staging.rename(repo / "gru" / "2")
            wait_for(lambda: sorted(m.version for m in client.list_models() if m.name == "gru") == ["1", "2"])
        result = replay(running, DEMO / "co2_weekly.csv", "--model", "nope")
        assert result.returncode == 2
        assert "the server has no model 'nope' (models: demo, gru)" in result.stderr
    finally:
        assert running.stop() == 0, running.log()
