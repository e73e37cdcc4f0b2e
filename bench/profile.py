"""Where the server's time goes: py-spy samples during a measurement, summarised per function.

Samples are taken without pausing the server (--nonblocking) and only while a thread is busy,
so "busy" per thread is samples / (rate x seconds), and a function's share is of those busy
samples. The raw collapsed stacks are kept beside the summary (flamegraph.pl or speedscope
read them).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE = 200
_LINE = re.compile(r":\d+\)$")


@dataclass
class Recording:
    process: subprocess.Popen[bytes]
    path: Path
    seconds: float


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


class Profiler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = py_spy()
        self._count = 0

    def start(self, pid: int, seconds: float) -> Recording:
        self._count += 1
        path = self.directory / f"profile-{self._count}.txt"
        whole = max(1, math.floor(seconds))
        command = [
            self.binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(whole),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "--output",
            str(path),
        ]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return Recording(process, path, whole)

    def finish(self, recording: Recording, name: str) -> dict[str, Any]:
        try:
            recording.process.wait(recording.seconds + 30)
        except subprocess.TimeoutExpired:
            recording.process.kill()
            return {"error": "py-spy did not finish"}
        if not recording.path.exists():
            return {"error": f"py-spy wrote nothing (exit {recording.process.returncode})"}
        final = recording.path.with_name(f"{name}-{recording.path.name}")
        recording.path.replace(final)
        return summarize(final.read_text(), RATE * recording.seconds) | {"raw": str(final)}


def _function(frame: str) -> str:
    """`Batcher._assemble (cellstream/batcher.py:212)` -> `Batcher._assemble (cellstream/batcher.py)`."""
    return _LINE.sub(")", frame)


def summarize(raw: str, expected: float, top: int = 15) -> dict[str, Any]:
    """Busy share per thread; self and inclusive shares of the main thread's busy samples."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    main = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
        thread = re.sub(r"-\d+", "", thread)  # Thread-3 (worker) -> Thread (worker)
        threads[thread] += count
        if thread != "MainThread":
            continue
        main += count
        functions = [_function(f) for f in frames[1:]]
        if functions:
            own[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / max(main, 1), 1)] for name, n in counter.most_common(top)]

    skip = ("runpy", "asyncio/runners.py", "base_events.py", "cli.py", "__main__", "events.py", "server.py")
    return {
        "busy_percent_by_thread": {t: round(100 * n / expected, 1) for t, n in threads.most_common()},
        "main_thread_self_percent": share(own),
        "main_thread_inclusive_percent": share(
            Counter({f: n for f, n in inclusive.items() if not any(s in f for s in skip)})
        ),
    }
