"""The rules a cluster map's fields obey, each refusal one line naming the field and the fix.

Values may come straight from JSON, so every type is checked too (a bool is not a number here,
and neither is 1.0).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

from cellstream.cluster.shards import MAX_SHARDS

Range = tuple[int, int]
# A Kubernetes pod name as a StatefulSet makes it (an RFC 1123 label): it is also a valid
# HAProxy backend name and a safe file name.
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_NAME_LENGTH = 63
_LABEL = r"[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV4ISH = re.compile(r"[0-9.]+")
MAX_HOSTNAME_LENGTH = 253


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_epoch(epoch: object) -> None:
    if not _is_int(epoch) or epoch < 1:  # type: ignore[operator]
        raise ValueError(f"epoch must be a whole number >= 1 (each new map takes the next), not {epoch!r}")


def check_shards(shards: object) -> None:
    if not _is_int(shards) or not 1 <= shards <= MAX_SHARDS:  # type: ignore[operator]
        raise ValueError(f"shards must be a whole number from 1 to {MAX_SHARDS}, not {shards!r}")


def name_problem(name: object) -> str | None:
    """What is wrong with a replica name; None when it is a valid one."""
    if isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and NAME.fullmatch(name):
        return None
    return (
        f"replica name {name!r} must be lower-case letters, digits and '-', start and end with a "
        f"letter or digit, and be at most {MAX_NAME_LENGTH} characters (a Kubernetes pod name)"
    )


def address_problem(address: object) -> str | None:
    """What is wrong with a host:port address; None when it is a valid one."""
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        if port.isascii() and port.isdigit() and 1 <= int(port) <= 65535 and _host_ok(host):
            return None
    return (
        f"address {address!r} must be host:port: a DNS name, an IPv4 address or an [IPv6] "
        "address, and a port from 1 to 65535"
    )


def _host_ok(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if _IPV4ISH.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= MAX_HOSTNAME_LENGTH and _HOSTNAME.fullmatch(host) is not None


def checked_replicas(replicas: object) -> dict[str, str]:
    """The replicas as a plain dict in their order, or ValueError."""
    if not isinstance(replicas, Mapping) or not replicas:
        raise ValueError(
            f'replicas must name at least one replica: {{"name": "host:port", ...}}, not {replicas!r}'
        )
    seen: dict[str, str] = {}  # address -> name
    checked: dict[str, str] = {}
    for name, address in replicas.items():
        problem = name_problem(name)
        if problem is None:
            problem = address_problem(address)
            problem = None if problem is None else f"replica {name!r}: {problem}"
        if problem is not None:
            raise ValueError(problem)
        if address in seen:
            raise ValueError(
                f"replicas {seen[address]!r} and {name!r} share the address {address!r}: "
                "each replica needs its own"
            )
        seen[address] = name
        checked[name] = address
    return checked


def checked_ranges(ranges: object, replicas: Mapping[str, str], shards: int) -> dict[str, tuple[Range, ...]]:
    """Each replica's ranges, sorted and with touching ranges joined, in the replicas' order.

    Checks each replica's own list; that no two replicas share a shard, and that none is left
    out, is the map's check (it needs every list at once)."""
    if not isinstance(ranges, Mapping):
        raise ValueError(
            'ranges must map each replica to its shard ranges: {"name": [[start, end], ...]}, '
            f"not {ranges!r}"
        )
    for name in ranges:
        if name not in replicas:
            raise ValueError(
                f"ranges names {name!r}, which is not in replicas ({', '.join(map(repr, replicas))})"
            )
    return {name: _checked_list(name, ranges.get(name), shards) for name in replicas}


def _checked_list(name: str, ranges: object, shards: int) -> tuple[Range, ...]:
    if ranges is None:
        raise ValueError(f"replica {name!r} has no entry in ranges (give it [] if it owns no shard)")
    if not isinstance(ranges, Sequence) or isinstance(ranges, str):
        raise ValueError(f"ranges[{name!r}] must be a list of [start, end] pairs, not {ranges!r}")
    pairs: list[Range] = []
    for i, pair in enumerate(ranges):
        if (
            not isinstance(pair, Sequence)
            or isinstance(pair, str)
            or len(pair) != 2
            or not all(map(_is_int, pair))
            or not 0 <= pair[0] < pair[1] <= shards
        ):
            raise ValueError(
                f"ranges[{name!r}][{i}] must be [start, end] with 0 <= start < end <= {shards} "
                f"(shards start..end-1), not {pair!r}"
            )
        pairs.append((pair[0], pair[1]))
    pairs.sort()
    joined: list[Range] = []
    for start, end in pairs:
        if joined and start < joined[-1][1]:
            raise ValueError(
                f"ranges[{name!r}] lists shard {start} twice ({list(joined[-1])} and {[start, end]} overlap)"
            )
        if joined and start == joined[-1][1]:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return tuple(joined)


def ranges_of(shards: Sequence[int]) -> tuple[Range, ...]:
    """Ascending shards as half-open ranges: [0, 1, 2, 7] -> ((0, 3), (7, 8))."""
    found: list[Range] = []
    for shard in shards:
        if found and shard == found[-1][1]:
            found[-1] = (found[-1][0], shard + 1)
        else:
            found.append((shard, shard + 1))
    return tuple(found)
