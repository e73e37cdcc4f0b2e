"""Talk to a running cellstream from the host, for image-test.sh.

Uses only the cellstream Python client and the standard library, so any Python where
`cellstream` is importable works (the repo's .venv).  Each command prints one JSON line and
exits non-zero with a message on stderr when a check fails.

    probe.py step ADDRESS STREAM N        N steps of a fixed reading; prints step + state digest
    probe.py state ADDRESS STREAM         GetState; prints step + state digest
    probe.py metrics URL NAME...          fetch /metrics, require each metric name to be present
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request
from typing import Any


def _digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].astype("<f4").tobytes())
    return h.hexdigest()[:16]


def _client(address: str) -> Any:
    from cellstream.client import Client  # noqa: PLC0415

    return Client(address, timeout=10.0)


def step(address: str, stream: str, n: int) -> dict[str, Any]:
    client = _client(address)
    try:
        models = {m.name: m for m in client.list_models()}
        reply = None
        for i in range(n):
            reply = client.step(stream, [0.1 * (i + 1)] * _input_size(models))
        assert reply is not None
        return {
            "step": int(reply.step),
            "state": _digest(reply.state),
            "output": [float(v) for v in reply.output],
        }
    finally:
        client.close()


def _input_size(models: dict[str, Any]) -> int:
    default = next((m for m in models.values() if m.is_default), None) or models["gru"]
    return int(default.input_size)


def state(address: str, stream: str) -> dict[str, Any]:
    client = _client(address)
    try:
        reply = client.get_state(stream)
        return {"step": int(reply.step), "state": _digest(reply.state)}
    finally:
        client.close()


def metrics(url: str, names: list[str]) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    present = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    missing = [n for n in names if not any(p == n or p.startswith(n + "_") for p in present)]
    if missing:
        raise SystemExit(f"metrics missing at {url}: {missing}")
    samples = {}
    for line in text.splitlines():
        if line.startswith("cellstream_steps_total"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return {"series": len(present), "steps_total": samples}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[1], argv[2:]
    if command == "step":
        result = step(args[0], args[1], int(args[2]))
    elif command == "state":
        result = state(args[0], args[1])
    elif command == "metrics":
        result = metrics(args[0], args[1:])
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
