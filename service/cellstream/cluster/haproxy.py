"""HAProxy routing for a cluster: each gRPC call goes to the owner of its stream's shard.

The frontend computes the shard as every replica does, from the `x-stream-id` header:
`req.fhdr(x-stream-id),url_dec,crc32,mod(S)` (`fhdr`, not `hdr`: `hdr` would take only what
follows a comma in an id; `url_dec` undoes the header's percent-encoding, see `shards`). A map
file (`shard owner`, one a line) names the owner's backend; a call without the header
(ListModels, health, exports) goes to any healthy replica. Replicas are reached over HTTP/2
cleartext (`proto h2`) and checked with a real gRPC health call (`h2check`).

A rebalance re-points moved shards with `set map` on the runtime API (the `stats socket`),
without a reload; every replica a map may route to needs its backend in the config first, so
the config for a move lists the old map's replicas and the new one's (`extra_replicas`).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cellstream.cluster.checks import checked_replicas
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.cluster.h2check import tcp_check_lines
from cellstream.cluster.shards import ROUTING_HEADER

ANY_BACKEND = "cellstream_any"  # '_' is in no replica name, so it can never clash with one
SHARD_HEADER = "cellstream-proxy-shard"  # on every routed reply: the shard HAProxy computed
CONFIG_FILE, MAP_FILE = "haproxy.cfg", "shards.map"
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./@:+=-]+")  # written into the config unquoted
_BIND = re.compile(r"[A-Za-z0-9_.:@*/\[\]-]+")  # 0.0.0.0:50051, [::]:50051, fd@3, unix@/path
_RUNTIME_TIMEOUT = 5.0


class RuntimeAPIError(RuntimeError):
    """HAProxy's runtime API refused a command, or could not be reached."""


@dataclass(frozen=True)
class ProxySettings:
    """Where HAProxy listens and where, on its machine, it finds the map file and its socket."""

    map_path: Path
    socket_path: Path
    bind: str = "0.0.0.0:50051"
    metrics_bind: str | None = None  # HAProxy's own Prometheus exporter, e.g. 0.0.0.0:8405
    max_streams: int = 1000  # tune.h2.max-concurrent-streams per client connection (default 100)
    check_interval_ms: int = 2000

    def __post_init__(self) -> None:
        for what, path in (("map path", self.map_path), ("socket path", self.socket_path)):
            if not path.is_absolute() or not _PLAIN_PATH.fullmatch(str(path)):
                raise ValueError(
                    f"HAProxy {what} '{path}' must be absolute and plain (letters, digits, "
                    "and _ . / @ : + = -): HAProxy reads it from its config unquoted"
                )
        for what, bind in (("bind", self.bind), ("metrics bind", self.metrics_bind)):
            if bind is not None and not _BIND.fullmatch(bind):
                raise ValueError(f"HAProxy {what} {bind!r} must be an address such as 0.0.0.0:50051")
        if self.max_streams < 1 or self.check_interval_ms < 100:
            raise ValueError("max_streams must be >= 1 and check_interval_ms >= 100")


def render_map(cluster_map: ClusterMap) -> str:
    """The map file: `shard backend`, one line per shard (HAProxy allows # comments)."""
    lines = [f"# cellstream cluster map epoch {cluster_map.epoch}, {cluster_map.shards} shards"]
    lines += [f"{shard} {cluster_map.owner_of(shard)}" for shard in range(cluster_map.shards)]
    return "\n".join(lines) + "\n"


def render_config(
    cluster_map: ClusterMap, settings: ProxySettings, extra_replicas: Mapping[str, str] | None = None
) -> str:
    """haproxy.cfg for a map. `extra_replicas` (name -> address) get backends too, with no shard
    yet (or no shard any more): what a rebalance's `set map` commands need to point to."""
    replicas = dict(cluster_map.replicas)
    for name, address in (checked_replicas(extra_replicas) if extra_replicas else {}).items():
        if replicas.setdefault(name, address) != address:
            raise ValueError(
                f"replica {name!r} is at {replicas[name]} in the map but at {address} in extra_replicas"
            )
    shard = f"req.fhdr({ROUTING_HEADER}),url_dec,crc32,mod({cluster_map.shards})"
    lines = [
        f"# Written by `cellstream cluster haproxy` for cluster map epoch {cluster_map.epoch}; "
        "regenerate rather than edit.",
        "global",
        # expose-fd: a reload outside master-worker mode (-x SOCKET -sf PID) takes over the listeners.
        f"    stats socket {settings.socket_path} mode 600 level admin expose-fd listeners",
        f"    tune.h2.max-concurrent-streams {settings.max_streams}",
        "",
        # Pods come back with new addresses: names are resolved again while running, not only at
        # start, and one that does not resolve yet starts the server down instead of failing.
        "resolvers cluster_dns",
        "    parse-resolv-conf",
        "    hold valid 10s",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        # A StepStream may be quiet for long: idle timeouts are long, gRPC keepalives end dead ones.
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout check 2s",
        "    default-server init-addr last,libc,none resolvers cluster_dns",
        "",
        "frontend cellstream",
        f"    bind {settings.bind} proto h2",
        f"    http-request set-var(txn.shard) {shard} if {{ req.fhdr({ROUTING_HEADER}) -m found }}",
        f"    use_backend %[var(txn.shard),map_int({settings.map_path},{ANY_BACKEND})] "
        "if { var(txn.shard) -m found }",
        f"    default_backend {ANY_BACKEND}",
        f"    http-response set-header {SHARD_HEADER} %[var(txn.shard)] if {{ var(txn.shard) -m found }}",
    ]
    for name, address in replicas.items():
        lines += ["", f"backend {name}", *(f"    {line}" for line in tcp_check_lines())]
        lines.append(f"    server {name} {address} proto h2 check inter {settings.check_interval_ms}")
    # Any replica answers calls of no stream; each server follows its own backend's check.
    lines += ["", f"backend {ANY_BACKEND}", "    balance roundrobin"]
    lines += [
        f"    server {name} {address} proto h2 track {name}/{name}" for name, address in replicas.items()
    ]
    if settings.metrics_bind:
        lines += [
            "",
            "frontend metrics",
            f"    bind {settings.metrics_bind}",
            "    http-request use-service prometheus-exporter if { path /metrics }",
        ]
    return "\n".join(lines) + "\n"


def write(
    cluster_map: ClusterMap,
    out: Path,
    settings: ProxySettings,
    extra_replicas: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write haproxy.cfg and shards.map into `out` (each atomically); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    config, mapping = out / CONFIG_FILE, out / MAP_FILE
    _write_atomically(mapping, render_map(cluster_map))
    _write_atomically(config, render_config(cluster_map, settings, extra_replicas))
    return config, mapping


def write_map_file(cluster_map: ClusterMap, path: Path) -> None:
    """Rewrite the map file after `set map`, so a restart or reload routes by the new map too."""
    _write_atomically(path, render_map(cluster_map))


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; HAProxy may run as another user
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def haproxy_set_map_commands(old: ClusterMap, new: ClusterMap, *, map_path: Path) -> list[str]:
    """The runtime-API commands that make a proxy routing by `old` route by `new`: one
    `set map` per shard whose owner changed, in shard order. `map_path` is the map file's path
    as the proxy's config names it (the runtime API knows a map by it)."""
    if old.shards != new.shards:
        raise ValueError(
            f"the maps have {old.shards} and {new.shards} shards: a cluster's shard count never changes"
        )
    if new.epoch < old.epoch:
        raise ValueError(f"map epoch {new.epoch} is older than the proxy's {old.epoch}: refusing to go back")
    return [
        f"set map {map_path} {shard} {new.owner_of(shard)}"
        for shard in range(new.shards)
        if new.owner_of(shard) != old.owner_of(shard)
    ]


def runtime_command(socket_path: Path, command: str, timeout: float = _RUNTIME_TIMEOUT) -> str:
    """Send one command to HAProxy's runtime API and return its answer ('' is success for `set`)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(socket_path))
            connection.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise RuntimeAPIError(
            f"HAProxy runtime API at '{socket_path}': {exc.strerror or exc} "
            "(is HAProxy running with this stats socket?)"
        ) from None
    return b"".join(chunks).decode(errors="replace").strip()


def apply_commands(socket_path: Path, commands: Iterable[str]) -> int:
    """Run `set map` commands one by one, stopping at the first refusal; returns how many ran."""
    done = 0
    for command in commands:
        answer = runtime_command(socket_path, command)
        if answer:  # a successful `set map` answers nothing
            raise RuntimeAPIError(f"HAProxy refused {command!r} after {done} commands: {answer}")
        done += 1
    return done
