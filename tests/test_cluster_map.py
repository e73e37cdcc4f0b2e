"""The cluster's pure parts: the shard function, the cluster map's rules, rebalancing, the map file
HAProxy reads and the runtime commands that re-point it. No server and no proxy needed."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cellstream.cluster import ClusterMap, ShardMove, routing_value, shard_of, shards_of, stream_id_of
from cellstream.tools import cluster as cluster_tool

THREE = {f"cellstream-{i}": f"cellstream-{i}.cellstream:50051" for i in range(3)}


def crc32_reference(data: bytes) -> int:
    """Bit-at-a-time CRC-32 (reflected polynomial 0xEDB88320), independent of zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def valid() -> dict[str, object]:
    return {
        "epoch": 3,
        "shards": 16,
        "replicas": {"a": "10.0.0.1:50051", "b": "b.cellstream:50051"},
        "ranges": {"a": [[0, 8]], "b": [[8, 16]]},
    }


# --- shards ---------------------------------------------------------------------------------------


def test_shard_is_crc32_of_the_utf8_id_mod_shards() -> None:
    assert crc32_reference(b"123456789") == 0xCBF43926  # the CRC-32 check value
    for stream_id in ["s1", "sensor-000042", "é", "日本語のストリーム", "emoji-🚀", "a,b c", "x" * 256]:
        for shards in (1, 7, 256, 65536):
            assert shard_of(stream_id, shards) == crc32_reference(stream_id.encode()) % shards


def test_shards_of_gives_each_ids_shard_in_order() -> None:
    ids = [f"stream-{i}" for i in range(500)] + ["é", "日本", "🚀"]
    got = shards_of(ids, 256)
    assert got.dtype == np.int64 and got.tolist() == [crc32_reference(s.encode()) % 256 for s in ids]
    assert shards_of(iter(ids), 256).tolist() == got.tolist()
    assert shards_of([], 256).tolist() == []


def test_routing_value_is_printable_ascii_and_plain_ids_travel_unchanged() -> None:
    assert routing_value("sensor-1.temp_2~x") == "sensor-1.temp_2~x"
    for stream_id in ["é", "a,b", " lead", "trail ", "100%", "q?x+y", "slash/x", "日本語", "🚀"]:
        value = routing_value(stream_id)
        assert value.isascii() and value.isprintable() and not set(value) & set(",?+ /")
        assert stream_id_of(value) == stream_id
    # The proxy sees only x-stream-id (the client's id), never the server's tenant-prefixed key:
    # every tenant's "s1" is in the shard of "s1".
    assert shard_of(stream_id_of(routing_value("s1")), 256) == shard_of("s1", 256)


# --- the map's rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": 0}, "epoch must be a whole number >= 1"),
        ({"epoch": True}, "epoch must be a whole number >= 1"),
        ({"epoch": 1.0}, "epoch must be a whole number >= 1"),
        ({"shards": 0}, "shards must be a whole number from 1 to 65536, not 0"),
        ({"shards": 65537}, "shards must be a whole number from 1 to 65536"),
        ({"replicas": {}}, "replicas must name at least one replica"),
        ({"replicas": ["a"]}, "replicas must name at least one replica"),
        ({"replicas": {"A": "h:1", "b": "g:1"}}, "replica name 'A' must be lower-case letters"),
        ({"replicas": {"-a": "h:1", "b": "g:1"}}, "replica name '-a' must be lower-case"),
        ({"replicas": {"a" * 64: "h:1", "b": "g:1"}}, "at most 63 characters"),
        ({"replicas": {"a": "host", "b": "g:1"}}, "replica 'a': address 'host' must be host:port"),
        ({"replicas": {"a": "h:0", "b": "g:1"}}, "a port from 1 to 65535"),
        ({"replicas": {"a": "h:65536", "b": "g:1"}}, "a port from 1 to 65535"),
        ({"replicas": {"a": "999.1.1.1:5", "b": "g:1"}}, "address '999.1.1.1:5' must be host:port"),
        ({"replicas": {"a": "bad host:5", "b": "g:1"}}, "address 'bad host:5' must be host:port"),
        ({"replicas": {"a": "[::1:5", "b": "g:1"}}, "must be host:port"),
        ({"replicas": {"a": 5, "b": "g:1"}}, "replica 'a': address 5 must be host:port"),
        ({"replicas": {"a": "h:1", "b": "h:1"}}, "replicas 'a' and 'b' share the address 'h:1'"),
        ({"ranges": [[0, 16]]}, "ranges must map each replica to its shard ranges"),
        ({"ranges": {"a": [[0, 16]], "b": [], "c": []}}, "ranges names 'c', which is not in replicas"),
        ({"ranges": {"a": [[0, 16]]}}, "replica 'b' has no entry in ranges (give it [] if it owns no shard)"),
        ({"ranges": {"a": [[0, 8]], "b": [[8, 17]]}}, "ranges['b'][0] must be [start, end] with 0 <= start"),
        ({"ranges": {"a": [[0, 8]], "b": [[8, 8], [8, 16]]}}, "not [8, 8]"),
        ({"ranges": {"a": [[0, 8]], "b": [[8, 12, 16]]}}, "ranges['b'][0] must be [start, end]"),
        ({"ranges": {"a": [[0, 8]], "b": [["8", 16]]}}, "ranges['b'][0] must be [start, end]"),
        ({"ranges": {"a": "0-8", "b": [[8, 16]]}}, "ranges['a'] must be a list of [start, end] pairs"),
        ({"ranges": {"a": [[0, 8], [4, 6]], "b": [[8, 16]]}}, "ranges['a'] lists shard 4 twice"),
        ({"ranges": {"a": [[0, 10]], "b": [[8, 16]]}}, "shard 8 is in the ranges of both 'a' and 'b'"),
        (
            {"ranges": {"a": [[0, 5]], "b": [[8, 16]]}},
            "shard 5 is in no replica's ranges (3 unowned, from 5 to 7): every shard from 0 to 15",
        ),
    ],
)
def test_a_bad_map_is_refused_with_one_line_naming_the_fix(change: dict[str, object], message: str) -> None:
    raw = valid() | change
    with pytest.raises(ValueError) as info:
        ClusterMap.from_json(json.dumps(raw))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON: line 1 column 2"),
        ("[1]", "must be a JSON object with epoch, shards, replicas, ranges; got list"),
        ('{"epoch": 1, "shards": 1, "replicas": {}, "ranges": {}, "owners": 1}', "unknown key 'owners'"),
        ('{"epoch": 1, "shards": 1, "ranges": {}}', "'replicas' is missing"),
    ],
)
def test_a_file_that_is_not_a_map_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ClusterMap.from_json(text)


def test_valid_addresses_and_names_are_accepted() -> None:
    replicas = {"cellstream-0": "[::1]:50051", "r1": "10.1.2.3:1", "x": "a.b-c.svc.cluster.local:65535"}
    cluster_map = ClusterMap.initial(replicas, 3)
    assert cluster_map.names == ("cellstream-0", "r1", "x")


def test_json_round_trip_keeps_the_map_and_joins_touching_ranges(tmp_path: Path) -> None:
    raw = valid() | {"ranges": {"a": [[4, 8], [0, 4]], "b": [[8, 16]]}}
    cluster_map = ClusterMap.from_json(json.dumps(raw))
    assert cluster_map.ranges["a"] == ((0, 8),)
    again = ClusterMap.from_json(cluster_map.to_json())
    assert again == cluster_map and json.loads(cluster_map.to_json()) == cluster_map.to_dict()
    path = tmp_path / "map.json"
    cluster_map.write(path)
    assert ClusterMap.read(path) == cluster_map and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError, match=r"cluster map '.*missing.json': No such file or directory"):
        ClusterMap.read(tmp_path / "missing.json")
    path.write_text("{")
    with pytest.raises(ValueError, match=r"cluster map '.*map.json': not valid JSON"):
        ClusterMap.read(path)


def test_owner_lookups_agree() -> None:
    cluster_map = ClusterMap.initial(THREE)
    ids = [f"stream-{i}" for i in range(300)]
    owners = cluster_map.owner_indexes(shards_of(ids, 256))
    assert [cluster_map.names[i] for i in owners] == [cluster_map.owner_of_stream(s) for s in ids]
    assert cluster_map.owner_of_stream("s1") == cluster_map.owner_of(crc32_reference(b"s1") % 256)
    with pytest.raises(ValueError, match="shard 256 is outside this map's 0 to 255"):
        cluster_map.owner_of(256)


# --- initial and rebalanced -------------------------------------------------------------------------


def test_initial_map_gives_contiguous_ranges_in_the_order_named() -> None:
    cluster_map = ClusterMap.initial(THREE)
    assert cluster_map.epoch == 1 and cluster_map.shards == 256
    assert [cluster_map.ranges[n] for n in THREE] == [((0, 86),), ((86, 171),), ((171, 256),)]
    assert cluster_map.owner_of(85) == "cellstream-0" and cluster_map.owner_of(86) == "cellstream-1"
    sizes = [
        len(ClusterMap.initial({f"r{i}": f"h{i}:1" for i in range(7)}, 10).shards_owned(f"r{i}"))
        for i in range(7)
    ]
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 2] and sum(sizes) == 10
    few = ClusterMap.initial({f"r{i}": f"h{i}:1" for i in range(5)}, 3)
    assert sum(1 for name in few.names if not few.ranges[name]) == 2


def assert_balanced(cluster_map: ClusterMap) -> None:
    sizes = {len(cluster_map.shards_owned(name)) for name in cluster_map.names}
    low = cluster_map.shards // len(cluster_map.names)
    assert sizes <= {low, low + (cluster_map.shards % len(cluster_map.names) > 0)}


def assert_moves_explain(old: ClusterMap, new: ClusterMap, moves: list[ShardMove]) -> None:
    changed = [
        s
        for s in range(old.shards)
        if old.owner_of(s) not in new.replicas or old.owner_of(s) != new.owner_of(s)
    ]
    assert [m.shard for m in moves] == changed
    assert all(m.source == old.owner_of(m.shard) and m.target == new.owner_of(m.shard) for m in moves)


def test_rebalance_3_to_4_moves_only_the_new_replicas_share() -> None:
    old = ClusterMap.initial(THREE)
    new, moves = old.rebalanced(add={"cellstream-3": "cellstream-3.cellstream:50051"})
    assert new.epoch == 2 and new.names == (*THREE, "cellstream-3")
    assert_balanced(new)
    assert_moves_explain(old, new, moves)
    # The fewest possible: the newcomer must end with 64 shards and only it gains any.
    assert len(moves) == 64 and {m.target for m in moves} == {"cellstream-3"}
    assert {len(new.shards_owned(name)) for name in new.names} == {64}


def test_rebalance_4_to_3_moves_only_the_removed_replicas_shards() -> None:
    four = ClusterMap.initial({**THREE, "cellstream-3": "cellstream-3.cellstream:50051"})
    new, moves = four.rebalanced(remove=["cellstream-3"])
    assert new.epoch == 2 and new.names == tuple(THREE) and "cellstream-3" not in new.ranges
    assert_balanced(new)
    assert_moves_explain(four, new, moves)
    assert len(moves) == 64 and {m.source for m in moves} == {"cellstream-3"}
    assert sorted(len(new.shards_owned(name)) for name in new.names) == [85, 85, 86]


def test_scaling_up_then_down_comes_back_to_the_first_ranges() -> None:
    old = ClusterMap.initial(THREE)
    up, _ = old.rebalanced(add={"cellstream-3": "cellstream-3.cellstream:50051"})
    down, _ = up.rebalanced(remove=["cellstream-3"])
    assert down.ranges == old.ranges and down.epoch == 3


def fewest_moves(owners: list[str], names: list[str]) -> int:
    """Brute force over every balanced assignment: the reference for small maps."""
    shards = len(owners)
    low, high = shards // len(names), -(-shards // len(names))
    best = shards
    for assignment in itertools.product(names, repeat=shards):
        if all(low <= assignment.count(n) <= high for n in names):
            best = min(best, sum(a != o for a, o in zip(assignment, owners, strict=True)))
    return best


@pytest.mark.parametrize(
    ("start", "add", "remove"),
    [(2, 1, 0), (3, 1, 0), (1, 2, 0), (4, 0, 1), (3, 0, 2), (3, 1, 1), (2, 2, 1)],
)
def test_rebalance_moves_the_fewest_shards_a_balanced_map_allows(start: int, add: int, remove: int) -> None:
    old = ClusterMap.initial({f"r{i}": f"h{i}:1" for i in range(start)}, 7)
    added = {f"n{i}": f"n{i}:1" for i in range(add)}
    removed = [f"r{i}" for i in range(remove)]
    new, moves = old.rebalanced(add=added, remove=removed)
    assert_balanced(new)
    assert_moves_explain(old, new, moves)
    assert len(moves) == fewest_moves([old.owner_of(s) for s in range(7)], list(new.names))


def test_an_unbalanced_map_is_balanced_and_a_balanced_one_is_left_alone() -> None:
    lopsided = ClusterMap.from_json(json.dumps(valid() | {"ranges": {"a": [[0, 14]], "b": [[14, 16]]}}))
    balanced, moves = lopsided.rebalanced()
    assert len(moves) == 6 and balanced.epoch == 4
    assert balanced.rebalanced() == (balanced, [])


@pytest.mark.parametrize(
    ("add", "remove", "message"),
    [
        ({}, ["z"], "cannot remove 'z': it is not in the map (replicas: cellstream-0, cellstream-1"),
        ({"cellstream-1": "x:1"}, [], "cannot add 'cellstream-1': it is already in the map at"),
        ({}, list(THREE), "cannot remove every replica: a cluster needs at least one"),
        ({"cellstream-0": "x:1"}, ["cellstream-0"], "cannot both add and remove 'cellstream-0'"),
        ({"New": "x:1"}, [], "replica name 'New' must be lower-case"),
        ({"n": "cellstream-0.cellstream:50051"}, [], "share the address"),
    ],
)
def test_a_rebalance_that_cannot_be_is_refused(add: dict[str, str], remove: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ClusterMap.initial(THREE).rebalanced(add=add, remove=remove)
    assert message in str(info.value)


# --- the commands -----------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cellstream")
    cluster_tool.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cluster_init_prints_a_first_map(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("cluster", "init", "--shards", "12", "cellstream-0=a:1", "cellstream-1=b:1") == 0
    cluster_map = ClusterMap.from_json(capsys.readouterr().out)
    assert cluster_map.epoch == 1 and cluster_map.ranges == {
        "cellstream-0": ((0, 6),),
        "cellstream-1": ((6, 12),),
    }
    assert run_cli("cluster", "init", "cellstream-0=a:1", "cellstream-0=b:1") == 2
    assert "replica 'cellstream-0' is named twice" in capsys.readouterr().err
    assert run_cli("cluster", "init", "Bad=a:1") == 2
    assert "replica name 'Bad'" in capsys.readouterr().err
