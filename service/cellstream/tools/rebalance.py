"""`cellstream cluster rebalance | status`: add or remove replicas, and see where a cluster stands
(the work is in tools/handoff.py, imported when a command runs: `--help` stays fast)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cellstream.tools.client_options import add_client_arguments

EXIT_FAILED, EXIT_USAGE = 1, 2


def register(cluster_commands: Any) -> None:
    """`rebalance` and `status` under `cellstream cluster`."""
    move = cluster_commands.add_parser(
        "rebalance",
        help="add or remove replicas, moving their shards' streams without losing a reading",
        description="For each group of shards changing owner: the source stops taking work for "
        "them (UNAVAILABLE: clients retry with seq) and finishes what it queued; their streams are "
        "exported and imported by the target; the new map (epoch + 1) goes to every replica, targets "
        "first, and to --map. The plan is kept in MAP.next first: a run stopped half-way is "
        "finished by running it again.",
    )
    move.add_argument("--map", type=Path, required=True, help="the cluster map file; rewritten at the end")
    move.add_argument("--add", action="append", default=[], type=_replica, metavar="NAME=HOST:PORT")
    move.add_argument("--remove", action="append", default=[], metavar="NAME")
    move.add_argument(
        "--haproxy-socket",
        type=Path,
        help="HAProxy's runtime-API socket: its routes are set to the new owners without a reload "
        "(its config must have a backend for every replica: `cluster haproxy --also NAME=ADDR`)",
    )
    move.add_argument(
        "--haproxy-map",
        type=Path,
        help="the shards.map file that HAProxy's config names (rewritten, and named in the commands)",
    )
    add_client_arguments(move)
    move.set_defaults(func=_run_rebalance)
    status = cluster_commands.add_parser("status", help="every replica's map epoch, and any hand-off planned")
    status.add_argument("--map", type=Path, required=True, help="the cluster map file")
    add_client_arguments(status)
    status.set_defaults(func=_run_status)


def _replica(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=HOST:PORT")
    return name, address


def _run_rebalance(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    from cellstream.cluster.haproxy import RuntimeAPIError  # noqa: PLC0415
    from cellstream.tools.handoff import Replicas, rebalance  # noqa: PLC0415

    if (args.haproxy_socket is None) != (args.haproxy_map is None):
        print(
            "cellstream cluster rebalance: give --haproxy-socket and --haproxy-map together", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        replicas = Replicas(args)
    except ValueError as exc:
        print(f"cellstream cluster rebalance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        print(json.dumps(rebalance(args, replicas)))
    except ValueError as exc:
        print(f"cellstream cluster rebalance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        print(
            f"cellstream cluster rebalance: {exc.code().name}: {exc.details()} (run it again to finish)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except RuntimeAPIError as exc:
        print(
            f"cellstream cluster rebalance: {exc}: the replicas hold the new map; run it again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        replicas.close()
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from cellstream.cluster.cluster_map import ClusterMap  # noqa: PLC0415
    from cellstream.tools.handoff import Replicas, epochs  # noqa: PLC0415

    try:
        replicas, cluster_map = Replicas(args), ClusterMap.read(args.map)
    except ValueError as exc:
        print(f"cellstream cluster status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        pending = args.map.with_name(args.map.name + ".next")
        report = {
            "epoch": cluster_map.epoch,
            "replicas": epochs(replicas, cluster_map),
            "planned_epoch": ClusterMap.read(pending).epoch if pending.exists() else None,
        }
        print(json.dumps(report))
    finally:
        replicas.close()
    return 0
