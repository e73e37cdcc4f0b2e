"""From raw runs to medians, ratios against the ceilings, pass/fail per target, and tables."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.load import Outcome

Row = dict[str, Any]

CELLSTREAM, ECHO, NAIVE, MB1 = "cellstream", "echo", "naive", "cellstream-mb1"
TARGETS = (CELLSTREAM, ECHO, NAIVE, MB1)
# Per idle stream of the default GRU: its 256 B of state plus 328 B of bookkeeping (ids, rows, steps…).
MEMORY_OVERHEAD_BYTES = 328


def summarize(outcomes: Iterable[Outcome], duration: float) -> Row:
    """Merge the load processes' outcomes of one run into steps/s and latency percentiles (ms)."""
    outcomes = list(outcomes)
    latencies = np.concatenate([o.latencies for o in outcomes]) if outcomes else np.empty(0)
    completed = sum(o.completed for o in outcomes)
    row: Row = {
        "steps_per_s": round(completed / duration, 1),
        "messages": len(latencies),
        "errors": sum(o.errors for o in outcomes),
    }
    if len(latencies):
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1000
        row.update(
            p50_ms=round(p50, 3),
            p90_ms=round(p90, 3),
            p99_ms=round(p99, 3),
            max_ms=round(float(latencies.max()) * 1000, 3),
        )
    else:
        row.update(p50_ms=None, p90_ms=None, p99_ms=None, max_ms=None)
    sent = sum(o.sent for o in outcomes)
    if sent:
        row["offered_per_s"] = round(sent / duration, 1)
    sample = next((o.error_sample for o in outcomes if o.error_sample), "")
    if sample:
        row["error_sample"] = sample
    for key in sorted({k for o in outcomes for k in o.extra}):
        values = [o.extra[key] for o in outcomes if key in o.extra and o.extra.get("batches", 1)]
        if values:
            row[key] = round(statistics.fmean(values), 2)
    return row


def median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return round(statistics.median(values), 3)


def medians(runs: list[Row]) -> Row:
    """Median over repeats of every number in the runs (cpu too)."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float) and k != "repeat"]
    row: Row = {k: median([r.get(k) for r in runs]) for k in keys}
    row["repeats"] = len(runs)
    cpu_keys = runs[0].get("cpu", {}).keys()
    row["cpu"] = {k: median([r["cpu"][k] for r in runs if "cpu" in r]) for k in cpu_keys}
    samples = [r["error_sample"] for r in runs if r.get("error_sample")]
    if samples:
        row["error_sample"] = samples[0]
    return row


@dataclass(frozen=True)
class Check:
    """One target of the issue: a measured ratio (or value) against its limit."""

    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    detail: str

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def as_row(self) -> Row:
        return {
            "check": self.name,
            "value": None if self.value is None else round(self.value, 3),
            "limit": ("≥ " if self.higher_is_better else "≤ ") + f"{self.limit:g}",
            "pass": self.passed,
            "detail": self.detail,
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _get(results: dict[str, Row], target: str, key: str) -> float | None:
    value = results.get(target, {}).get(key)
    return None if value is None else float(value)


def checks_for(scenario: str, results: dict[str, Row], context: Row) -> list[Check]:
    """The issue's targets that a scenario's medians decide."""

    def cs(key: str) -> float | None:
        return _get(results, CELLSTREAM, key)

    def echo(key: str) -> float | None:
        return _get(results, ECHO, key)

    checks: list[Check] = []
    if scenario in ("unary", "stream"):
        checks.append(
            Check(
                f"{scenario}: steps/s vs echo",
                _ratio(cs("steps_per_s"), echo("steps_per_s")),
                0.9,
                True,
                "cellstream / echo steps/s",
            )
        )
        checks.append(
            Check(
                f"{scenario}: p99 vs echo",
                _ratio(cs("p99_ms"), echo("p99_ms")),
                1.5,
                False,
                "cellstream / echo p99 latency",
            )
        )
    elif scenario.startswith("batch"):
        compute = context.get("compute_10000")
        ceiling = (
            min(v for v in (echo("steps_per_s"), compute) if v) if echo("steps_per_s") or compute else None
        )
        checks.append(
            Check(
                f"{scenario}: steps/s vs min(echo, onnxruntime@10000)",
                _ratio(cs("steps_per_s"), ceiling),
                0.7,
                True,
                f"ceiling {ceiling} steps/s",
            )
        )
        checks.append(
            Check(
                f"{scenario}: steps/s vs naive",
                _ratio(cs("steps_per_s"), _get(results, NAIVE, "steps_per_s")),
                3.0,
                True,
                "cellstream / naive baseline steps/s",
            )
        )
    elif scenario == "fanin":
        checks.append(
            Check(
                "fanin: p99 vs echo at the same rate",
                _ratio(cs("p99_ms"), echo("p99_ms")),
                2.0,
                False,
                f"offered {context.get('fanin_rate')} readings/s",
            )
        )
        checks.append(Check("fanin: errors", cs("errors"), 0, False, "refused or unanswered readings"))
    elif scenario == "coalesce":
        echo_stream = context.get("echo_stream_steps")
        checks.append(
            Check(
                "coalesce: steps/s vs echo stream",
                _ratio(cs("steps_per_s"), echo_stream),
                10.0,
                True,
                f"echo stream {echo_stream} steps/s",
            )
        )
    return checks


def memory_check(row: Row, state_bytes: int) -> Check:
    return Check(
        "memory: bytes per idle stream",
        row.get("bytes_per_stream"),
        state_bytes + MEMORY_OVERHEAD_BYTES,
        False,
        f"{row.get('streams')} streams; state itself is {state_bytes} B",
    )


def startup_check(row: Row) -> Check:
    return Check(
        "startup: process start to SERVING (s)",
        row.get("median_s"),
        1.0,
        False,
        f"median of {len(row.get('runs_s', []))} starts",
    )


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}"
    if isinstance(value, int | float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(lines: list[Row]) -> str:
    rows = []
    for line in lines:
        for target, r in line.get("results", {}).items():
            cpu = r.get("cpu", {})
            rows.append(
                [
                    line["scenario"],
                    target,
                    _fmt(r.get("steps_per_s")),
                    _fmt(r.get("p50_ms"), 2),
                    _fmt(r.get("p90_ms"), 2),
                    _fmt(r.get("p99_ms"), 2),
                    _fmt(r.get("max_ms"), 1),
                    _fmt(r.get("errors")),
                    _fmt(cpu.get("server"), 2),
                    _fmt(cpu.get("clients"), 2),
                    _fmt(cpu.get("other"), 2),
                ]
            )
    header = [
        "scenario",
        "server",
        "steps/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "server cores",
        "client cores",
        "other cores",
    ]
    return markdown(header, rows)


def checks_table(checks: list[Row]) -> str:
    def mark(passed: bool | None) -> str:
        return "n/a" if passed is None else ("PASS" if passed else "FAIL")

    rows = [
        [
            c["check"],
            _fmt(c["value"], 3) if isinstance(c["value"], float) else _fmt(c["value"]),
            c["limit"],
            mark(c["pass"]),
            c["detail"],
        ]
        for c in checks
    ]
    return markdown(["target", "measured", "limit", "result", "detail"], rows)
