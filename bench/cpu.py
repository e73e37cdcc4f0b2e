"""Who used the CPU during a measurement: the server, the load generator, the rest of the machine.

Machine-wide busy time comes from /proc/stat, per-process time from psutil; both are in clock
ticks, so "other" (busy time of processes that are not ours) is a plain difference. Values are
in cores: 1.0 means one core fully busy for the whole window.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

CORES = os.cpu_count() or 1


def machine_ticks() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs since boot (guest time is already inside user time)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq + steal
    return busy / hz, (busy + idle + iowait) / hz


def process_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True)
class Snapshot:
    at: float
    busy: float
    total: float
    groups: dict[str, float]


def snapshot(groups: Mapping[str, Sequence[int]]) -> Snapshot:
    """CPU seconds so far, per named group of pids and for the whole machine."""
    busy, total = machine_ticks()
    return Snapshot(
        time.monotonic(),
        busy,
        total,
        {name: sum(map(process_seconds, pids)) for name, pids in groups.items()},
    )


def usage(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Cores used per group over the window, plus `machine` (all busy) and `other` (not ours)."""
    wall = max(after.at - before.at, 1e-9)
    result = {name: round((after.groups[name] - before.groups[name]) / wall, 3) for name in after.groups}
    machine = (after.busy - before.busy) / wall
    result["machine"] = round(machine, 3)
    result["other"] = round(max(0.0, machine - sum(v for k, v in result.items() if k != "machine")), 3)
    result["cores"] = CORES
    return result


def idle_load(seconds: float = 1.0) -> dict[str, float]:
    """How busy the machine is before the bench starts anything (cores) and the load averages."""
    before = snapshot({"bench": [os.getpid()]})
    time.sleep(seconds)
    after = snapshot({"bench": [os.getpid()]})
    result = usage(before, after)
    one, five, fifteen = os.getloadavg()
    return {
        "other": result["other"],
        "machine": result["machine"],
        "loadavg_1m": one,
        "loadavg_5m": five,
        "loadavg_15m": fifteen,
        "cores": CORES,
    }
