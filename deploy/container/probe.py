"""Talk to a running cellstream from the host, for image-test.sh.

Uses only the cellstream Python client and the standard library, so any Python where
`cellstream` is importable works (the repo's .venv).  Each command prints one JSON line and
exits non-zero with a message on stderr when a check fails.

    probe.py step ADDRESS STREAM N        N steps of a fixed reading; prints step + state digest
    probe.py state ADDRESS STREAM         GetState; prints step + state digest
    probe.py refused ADDRESS STREAM CODE SIZE
                                          a step (SIZE values) that must fail with status CODE
    probe.py metrics URL NAME...          fetch /metrics, require each metric name to be present

TLS and the token come from the variables the client commands read (CELLSTREAM_TLS_CA,
CELLSTREAM_TLS_CLIENT_CERT, CELLSTREAM_TLS_CLIENT_KEY; CELLSTREAM_TOKEN or
CELLSTREAM_TOKEN_FILE), so that no secret is on a command line; without them the probe speaks
plaintext and sends no token.
"""

from __future__ import annotations

import argparse
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
    from cellstream.tools.client_options import client_from  # noqa: PLC0415

    # The client commands' own rules for the TLS and token variables: the probe sees what
    # `cellstream replay` would.
    return client_from(argparse.Namespace(address=address, timeout=10.0))


def step(address: str, stream: str, n: int) -> dict[str, Any]:
    client = _client(address)
    try:
        models = {m.name: m for m in client.list_models()}
        reply, size = None, _input_size(models)
        for i in range(n):
            reply = client.step(stream, [0.1 * (i + 1)] * size)
        assert reply is not None
        return {
            "input_size": size,
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


def refused(address: str, stream: str, code: str, size: int) -> dict[str, Any]:
    import grpc  # noqa: PLC0415

    client = _client(address)
    try:
        client.step(stream, [0.5] * size)
    except grpc.RpcError as error:
        got, message = error.code().name, error.details()
    else:
        got, message = "OK", ""
    finally:
        client.close()
    if got != code:
        raise SystemExit(f"a step of {stream!r} at {address} got {got} ({message}), want {code}")
    return {"code": got, "message": message}


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
    elif command == "refused":
        result = refused(args[0], args[1], args[2], int(args[3]))
    elif command == "metrics":
        result = metrics(args[0], args[1:])
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
