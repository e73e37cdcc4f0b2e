"""The metrics tables in the README and docs/operations.md say what the live /metrics endpoint serves.

A real server (a copy of the bundled repository, snapshots on, a small --max-queue) gets traffic
that makes every metric family show at least one sample: Step, StepStream and StepBatch, refused
and failing requests, a snapshot, a model version refused at load. Then each table must name every
`cellstream_*` metric the endpoint serves, with its type and label names, and nothing else.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellstream.client import step_request
from support import MODELS, REPO, RunningServer, start_server, wait_for
from test_server import sample, scrape

PREFIX = "cellstream_"
# (file, heading of the section holding its metrics table)
TABLES = [("README.md", "## Metrics"), ("docs/operations.md", "### Metrics")]
MAX_QUEUE = 4


@dataclass(frozen=True)
class Metric:
    """One metric as a user queries it (a counter by its `_total` name), its type and label names."""

    type: str
    labels: frozenset[str]
    reasons: frozenset[str] = frozenset()
    """The values of its `reason` label (live), or the text of its table row (documented)."""


def traffic(server: RunningServer, repo: Path, aside: Path) -> None:
    """Requests that give every metric family a sample."""
    with server.client() as client:
        client.step("docs-step", np.zeros(8, np.float32), model="gru")
        client.step("docs-demo", [315.7])
        list(client.step_stream([step_request("docs-stream", [316.0 + k]) for k in range(3)]))
        client.step_batch(["docs-a", "docs-b"], np.zeros((2, 8), np.float32), model="gru2")
        failing = [
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step("docs-bad", np.zeros(3), model="gru")),
            (grpc.StatusCode.NOT_FOUND, lambda: client.step("docs-unknown", [1.0], model="nope")),
            # More readings than --max-queue: refused before running (reason="queue_full").
            (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                lambda: client.step_batch(
                    [f"docs-{k}" for k in range(MAX_QUEUE + 1)], np.zeros((MAX_QUEUE + 1, 8)), model="gru"
                ),
            ),
        ]
        for code, call in failing:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == code, info.value.details()
    # A new model whose file is not a model: refused at load, counted in model_load_failures.
    (aside / "broken" / "1").mkdir(parents=True)
    (aside / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    (aside / "broken").rename(repo / "broken")
    wait_for(lambda: "refused model broken" in server.log())
    wait_for(lambda: sample(scrape(server), "cellstream_snapshot_last_success_timestamp_seconds") > 0)


def live_metrics(text: str) -> dict[str, Metric]:
    """The endpoint's metrics; the `_created` series prometheus_client adds to counters and
    histograms are folded into their metric, and documented once as such."""
    families = list(text_string_to_metric_families(text))
    with_created = {f.name for f in families if f.type in ("counter", "histogram")}
    found = {}
    for family in families:
        if not family.name.startswith(PREFIX):
            continue  # process_* and python_*: prometheus_client's own, documented by it
        if family.name.endswith("_created") and family.name.removesuffix("_created") in with_created:
            continue
        assert family.samples, f"the test's traffic gave {family.name} no sample: extend traffic()"
        labels = {name for s in family.samples for name in s.labels} - {"le"}
        reasons = {s.labels["reason"] for s in family.samples if "reason" in s.labels}
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = Metric(family.type, frozenset(labels), frozenset(reasons))
    return found


def documented_metrics(path: Path, heading: str) -> dict[str, Metric]:
    """The first table after the heading: | metric(s) | type | labels | meaning |. A cell may name
    several metrics; a name without the `cellstream_` prefix gets it (docs/operations.md)."""
    lines = path.read_text().splitlines()
    start = lines.index(heading)
    rows = list(first_table(lines[start + 1 :]))
    assert rows, f"{path}: no table after {heading!r}"
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["metric", "type", "labels", "meaning"], f"{path}: table header {header}"
    found: dict[str, Metric] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 4, f"{path}: row {row!r} does not have 4 cells"
        names, kind, labels, meaning = cells
        metric = Metric(
            kind,
            frozenset(label.strip() for label in labels.split(",") if label.strip()),
            frozenset(re.findall(r"`([a-z_]+)`", meaning)),
        )
        for name in re.findall(r"`([a-z_]+)`", names):
            full = name if name.startswith(PREFIX) else PREFIX + name
            assert full not in found, f"{path}: {full} has two rows"
            found[full] = metric
    return found


def first_table(lines: list[str]) -> Iterator[str]:
    """The lines of the first markdown table in lines (blank lines and prose before it skipped)."""
    at = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    for line in lines[at:]:
        if not line.startswith("|"):
            return
        yield line


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Metric], str]:
    """The metrics of a server that has seen every kind of traffic, and the endpoint's raw text."""
    tmp = tmp_path_factory.mktemp("metrics-docs")
    repo = tmp / "repo"
    shutil.copytree(MODELS, repo, ignore=shutil.ignore_patterns("*.py", "*.md"))
    server = start_server(
        tmp / "run",
        "--state-dir",
        str(tmp / "state"),
        "--snapshot-interval",
        "0.2",
        "--max-queue",
        str(MAX_QUEUE),
        "--model-poll-interval",
        "0.05",
        models=repo,
    )
    try:
        traffic(server, repo, tmp / "aside")
        text = scrape(server)
    finally:
        assert server.stop() == 0, server.log()
    return live_metrics(text), text


@pytest.mark.parametrize(("doc", "heading"), TABLES)
def test_metrics_table_names_every_live_metric_and_nothing_else(
    live: tuple[dict[str, Metric], str], doc: str, heading: str
) -> None:
    metrics, _ = live
    documented = documented_metrics(REPO / doc, heading)
    assert sorted(set(metrics) - set(documented)) == [], f"{doc}: served but not in its metrics table"
    assert sorted(set(documented) - set(metrics)) == [], f"{doc}: documented but not served"


@pytest.mark.parametrize(("doc", "heading"), TABLES)
def test_metrics_table_gives_each_metric_its_type_and_label_names(
    live: tuple[dict[str, Metric], str], doc: str, heading: str
) -> None:
    metrics, _ = live
    documented = documented_metrics(REPO / doc, heading)
    wrong = {
        name: {"served": (m.type, sorted(m.labels)), "documented": (d.type, sorted(d.labels))}
        for name, m in metrics.items()
        if (d := documented.get(name)) is not None and (d.type, d.labels) != (m.type, m.labels)
    }
    assert wrong == {}, doc


@pytest.mark.parametrize(("doc", "heading"), TABLES)
def test_metrics_table_lists_every_reason_the_endpoint_reports(
    live: tuple[dict[str, Metric], str], doc: str, heading: str
) -> None:
    metrics, _ = live
    documented = documented_metrics(REPO / doc, heading)
    missing = {
        name: sorted(m.reasons - documented[name].reasons)
        for name, m in metrics.items()
        if name in documented and m.reasons - documented[name].reasons
    }
    assert missing == {}, f"{doc}: reason values served but not named in the row's meaning"


@pytest.mark.parametrize(("doc", "heading"), TABLES)
def test_the_created_series_are_explained(
    live: tuple[dict[str, Metric], str], doc: str, heading: str
) -> None:
    _, text = live
    if "_created" not in text:
        pytest.skip("this prometheus_client serves no _created series")
    section = (REPO / doc).read_text().split(heading, 1)[1]
    assert "`_created`" in section.split("\n#", 1)[0], f"{doc}: the {heading!r} section never says `_created`"


def test_unknown_model_names_are_counted_as_unknown(live: tuple[dict[str, Metric], str]) -> None:
    _, text = live
    assert 'code="NOT_FOUND",method="Step",model="unknown"' in text
    assert 'model="nope"' not in text
