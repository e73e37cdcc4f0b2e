"""`cellstream cluster init | haproxy`: a first cluster map, and the HAProxy files that route by it.

`init` prints the map (JSON) rather than writing it: it is reviewed and then kept where the
deployment keeps config (a file, a ConfigMap). `haproxy` turns a map into haproxy.cfg and
shards.map; the paths HAProxy will use on its own machine are options, because a container
reads the files from where they are mounted, not from where they were written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cellstream.cluster.shards import DEFAULT_SHARDS, MAX_SHARDS

EXIT_USAGE = 2


def register(commands: Any) -> Any:
    """Add `cluster` to the top-level sub-commands (argparse's sub-parsers object); returns the
    `cluster` sub-commands, so others (rebalance, status) can join them."""
    cluster = commands.add_parser("cluster", help="cluster maps and the HAProxy routing for them")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    init = cluster_commands.add_parser(
        "init",
        help="print a first cluster map (JSON) for the replicas named",
        description="Print a cluster map of epoch 1: every shard given to one replica, in "
        "contiguous ranges in the order the replicas are named (as Flink assigns key groups).",
    )
    init.add_argument(
        "--shards",
        type=_shard_count,
        default=DEFAULT_SHARDS,
        help=f"virtual shards of the cluster; fixed for its life (default {DEFAULT_SHARDS})",
    )
    init.add_argument("replicas", nargs="+", type=_replica, metavar="NAME=HOST:PORT")
    init.set_defaults(func=_init)

    proxy = cluster_commands.add_parser(
        "haproxy",
        help="write haproxy.cfg and shards.map that route each call to its stream's replica",
        description="Write an HAProxy config and map file for a cluster map: each gRPC call is "
        "routed by its x-stream-id header to the replica owning the stream's shard; calls "
        "without it go to any healthy replica. Check the result with: haproxy -c -f OUT/haproxy.cfg",
    )
    proxy.add_argument("--map", type=Path, required=True, help="the cluster map file (JSON)")
    proxy.add_argument("--out", type=Path, required=True, help="the folder to write the two files into")
    proxy.add_argument("--bind", default="0.0.0.0:50051", help="where HAProxy takes gRPC calls (h2c)")
    proxy.add_argument(
        "--map-path",
        type=Path,
        help="the map file's path where HAProxy runs (default: OUT/shards.map, made absolute)",
    )
    proxy.add_argument(
        "--socket",
        type=Path,
        help="HAProxy's runtime-API socket, for `set map` during a rebalance "
        "(default: OUT/haproxy.sock, made absolute)",
    )
    proxy.add_argument("--metrics-bind", help="also serve HAProxy's Prometheus metrics here (/metrics)")
    proxy.add_argument(
        "--max-streams",
        type=int,
        default=1000,
        help="concurrent gRPC calls per client connection (tune.h2.max-concurrent-streams)",
    )
    proxy.add_argument(
        "--also",
        action="append",
        type=_replica,
        default=[],
        metavar="NAME=HOST:PORT",
        help="a backend for a replica not (or no longer) in the map, for a rebalance (repeatable)",
    )
    proxy.set_defaults(func=_haproxy)
    return cluster_commands


def _replica(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"{text!r} must be NAME=HOST:PORT, e.g. cellstream-0=10.0.0.5:50051")
    return name, address


def _shard_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from 1 to {MAX_SHARDS}")
    return value


def _named(pairs: list[tuple[str, str]], command: str) -> dict[str, str] | None:
    named: dict[str, str] = {}
    for name, address in pairs:
        if name in named:
            print(f"cellstream cluster {command}: replica {name!r} is named twice", file=sys.stderr)
            return None
        named[name] = address
    return named


def _init(args: argparse.Namespace) -> int:
    from cellstream.cluster.cluster_map import ClusterMap  # noqa: PLC0415 - keep `--help` fast

    replicas = _named(args.replicas, "init")
    if replicas is None:
        return EXIT_USAGE
    try:
        cluster_map = ClusterMap.initial(replicas, args.shards)
    except ValueError as exc:
        print(f"cellstream cluster init: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(cluster_map.to_json())
    return 0


def _haproxy(args: argparse.Namespace) -> int:
    from cellstream.cluster import haproxy  # noqa: PLC0415
    from cellstream.cluster.cluster_map import ClusterMap  # noqa: PLC0415

    extra = _named(args.also, "haproxy")
    if extra is None:
        return EXIT_USAGE
    out = args.out.absolute()
    try:
        cluster_map = ClusterMap.read(args.map)
        settings = haproxy.ProxySettings(
            map_path=(args.map_path or out / haproxy.MAP_FILE),
            socket_path=(args.socket or out / "haproxy.sock"),
            bind=args.bind,
            metrics_bind=args.metrics_bind,
            max_streams=args.max_streams,
        )
        config, mapping = haproxy.write(cluster_map, out, settings, extra)
    except ValueError as exc:
        print(f"cellstream cluster haproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"cellstream cluster haproxy: --out '{args.out}': {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote {config} and {mapping}: epoch {cluster_map.epoch}, {cluster_map.shards} shards on "
        f"{len(cluster_map.replicas)} replicas; check it with: haproxy -c -f {config}"
    )
    return 0
