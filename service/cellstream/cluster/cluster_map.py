"""The cluster map: which replica owns each shard, versioned by an epoch.

A map is checked as strictly as a config file read from disk, because it is one: every shard
has exactly one owner, ranges are in bounds and never overlap, names are Kubernetes pod names
(a StatefulSet's `cellstream-0…N-1`), addresses are host:port. A bad map is a ValueError with
one line that says what to fix; a map that exists is valid.

The file (JSON):

    {"epoch": 1, "shards": 256,
     "replicas": {"cellstream-0": "cellstream-0.cellstream:50051", ...},
     "ranges": {"cellstream-0": [[0, 86]], ...}}

`ranges` are half-open `[start, end)` shard ranges, as Flink assigns key groups: contiguous at
first (`initial`), and after a rebalance each replica keeps most of what it had.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from cellstream.cluster import checks
from cellstream.cluster.balance import balance
from cellstream.cluster.shards import DEFAULT_SHARDS, shard_of

Range = tuple[int, int]
_KEYS = ("epoch", "shards", "replicas", "ranges")


class ShardMove(NamedTuple):
    """One shard changing owner in a rebalance."""

    shard: int
    source: str
    target: str


@dataclass(frozen=True)
class ClusterMap:
    """A validated, immutable map; `replicas` keeps its order (the order `initial` assigns in)."""

    epoch: int
    shards: int
    replicas: Mapping[str, str]
    ranges: Mapping[str, tuple[Range, ...]]
    _owners: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _owner_index: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks.check_epoch(self.epoch)
        checks.check_shards(self.shards)
        replicas = checks.checked_replicas(self.replicas)
        ranges = checks.checked_ranges(self.ranges, replicas, self.shards)
        names = tuple(replicas)
        index = np.full(self.shards, -1, dtype=np.int32)
        for position, name in enumerate(names):
            for start, end in ranges[name]:
                taken = np.flatnonzero(index[start:end] >= 0)
                if taken.size:
                    shard = start + int(taken[0])
                    raise ValueError(
                        f"shard {shard} is in the ranges of both {names[index[shard]]!r} and {name!r}: "
                        "every shard needs exactly one owner"
                    )
                index[start:end] = position
        unowned = np.flatnonzero(index < 0)
        if unowned.size:
            first, last = int(unowned[0]), int(unowned[-1])
            raise ValueError(
                f"shard {first} is in no replica's ranges ({unowned.size} unowned, from {first} to "
                f"{last}): every shard from 0 to {self.shards - 1} needs exactly one owner"
            )
        index.flags.writeable = False
        object.__setattr__(self, "replicas", MappingProxyType(replicas))
        object.__setattr__(self, "ranges", MappingProxyType(ranges))
        object.__setattr__(self, "_owners", tuple(names[i] for i in index.tolist()))
        object.__setattr__(self, "_owner_index", index)

    __hash__ = None  # type: ignore[assignment]  # (a map holds mappings: compare it, never hash it)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}: {len(self.shards_owned(name))}" for name in self.names)
        return f"ClusterMap(epoch={self.epoch}, shards={self.shards}, owned={{{counts}}})"

    @property
    def names(self) -> tuple[str, ...]:
        """The replicas' names, in the map's order (what `owner_indexes` indexes)."""
        return tuple(self.replicas)

    def owner_of(self, shard: int) -> str:
        """The replica that owns `shard` (a table look-up)."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is outside this map's 0 to {self.shards - 1}")
        return self._owners[shard]

    def owner_of_stream(self, stream_id: str) -> str:
        """The replica that owns a client stream id (see `shards.shard_of`)."""
        return self._owners[shard_of(stream_id, self.shards)]

    def owner_indexes(self, shards: np.ndarray) -> np.ndarray:
        """The owners of many shards (from `shards_of`), as positions in `names`: one gather."""
        owners: np.ndarray = self._owner_index[shards]
        return owners

    def address_of(self, name: str) -> str:
        return self.replicas[name]

    def shards_owned(self, name: str) -> list[int]:
        """Every shard `name` owns, ascending."""
        return [shard for start, end in self.ranges[name] for shard in range(start, end)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shards": self.shards,
            "replicas": dict(self.replicas),
            "ranges": {name: [list(r) for r in ranges] for name, ranges in self.ranges.items()},
        }

    def to_json(self) -> str:
        """The map file's text: one replica a line, so a rebalance reads as a short diff."""
        replicas = ",\n".join(f"    {json.dumps(n)}: {json.dumps(a)}" for n, a in self.replicas.items())
        ranges = ",\n".join(
            f"    {json.dumps(n)}: {json.dumps([list(r) for r in rs])}" for n, rs in self.ranges.items()
        )
        return (
            f'{{\n  "epoch": {self.epoch},\n  "shards": {self.shards},\n'
            f'  "replicas": {{\n{replicas}\n  }},\n  "ranges": {{\n{ranges}\n  }}\n}}\n'
        )

    @classmethod
    def from_json(cls, text: str) -> ClusterMap:
        """Parse and check a map file's text; ValueError with one line saying what to fix."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"must be a JSON object with {', '.join(_KEYS)}; got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}: a map holds only {', '.join(_KEYS)}")
        missing = [key for key in _KEYS if key not in raw]
        if missing:
            raise ValueError(f"{missing[0]!r} is missing: a map holds {', '.join(_KEYS)}")
        return cls(raw["epoch"], raw["shards"], raw["replicas"], raw["ranges"])

    @classmethod
    def read(cls, path: Path) -> ClusterMap:
        """Read a map file; ValueError naming the file on any problem (missing, unreadable, bad)."""
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cluster map '{path}': {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"cluster map '{path}': {exc}") from None

    def write(self, path: Path) -> None:
        """Write the map file atomically (a reader sees the old map or the new one, never half)."""
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(self.to_json())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def initial(cls, replicas: Mapping[str, str], shards: int = DEFAULT_SHARDS) -> ClusterMap:
        """Epoch 1: contiguous ranges in the replicas' order, sizes ⌊S/N⌋ or ⌈S/N⌉ (as Flink
        assigns key groups to operator instances)."""
        count = len(replicas)
        if count == 0:
            raise ValueError("replicas must name at least one replica (name=host:port)")
        checks.check_shards(shards)
        bounds = [(i * shards + count - 1) // count for i in range(count + 1)]
        ranges = {
            name: ((bounds[i], bounds[i + 1]),) if bounds[i] < bounds[i + 1] else ()
            for i, name in enumerate(replicas)
        }
        return cls(1, shards, dict(replicas), ranges)

    def rebalanced(
        self, add: Mapping[str, str] | None = None, remove: Iterable[str] = ()
    ) -> tuple[ClusterMap, list[ShardMove]]:
        """The next map (epoch + 1) with replicas added and removed, and the shards that move.

        Each replica ends with ⌊S/N⌋ or ⌈S/N⌉ shards, and as few shards move as that allows: a
        removed replica's shards all move, a remaining one gives up only what it holds above
        its share (its highest shards, so its low ranges stay whole), and the replicas that
        hold most now are the ones that keep ⌈S/N⌉. A map that is balanced, with nothing added or
        removed, comes back as it is, with no moves.
        """
        added = dict(add or {})
        removed = list(dict.fromkeys(remove))
        for name in removed:
            if name not in self.replicas:
                raise ValueError(
                    f"cannot remove {name!r}: it is not in the map (replicas: {', '.join(self.names)})"
                )
            if name in added:
                raise ValueError(f"cannot both add and remove {name!r}")
        for name in added:
            if name in self.replicas and name not in removed:
                raise ValueError(f"cannot add {name!r}: it is already in the map at {self.replicas[name]}")
        survivors = [name for name in self.names if name not in removed]
        if not survivors and not added:
            raise ValueError("cannot remove every replica: a cluster needs at least one")
        owned = {name: self.shards_owned(name) for name in survivors}
        owned.update({name: [] for name in added})
        gone = [shard for name in removed for shard in self.shards_owned(name)]
        assignment = balance(owned, gone, self.shards)
        moves = [
            ShardMove(shard, self._owners[shard], name)
            for name, shards in assignment.items()
            for shard in shards
            if self._owners[shard] != name
        ]
        if not moves and not added and not removed:
            return self, []
        replicas = {name: self.replicas[name] for name in survivors} | added
        ranges = {name: checks.ranges_of(assignment[name]) for name in replicas}
        moves.sort()
        return ClusterMap(self.epoch + 1, self.shards, replicas, ranges), moves
