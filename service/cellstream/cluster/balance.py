"""Share shards out evenly while moving as few as possible (the rebalance's arithmetic, pure).

With S shards on N replicas each ends with ⌊S/N⌋ or ⌈S/N⌉. The shards that must move are those
of removed replicas plus whatever a remaining replica holds above its share; giving the ⌈S/N⌉
shares to the replicas that hold most now makes that excess as small as it can be, so no
assignment with the same balance moves fewer shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def balance(owned: Mapping[str, Sequence[int]], orphans: Sequence[int], shards: int) -> dict[str, list[int]]:
    """Each replica's shards after balancing, ascending.

    `owned`: every replica of the new map (in its order) and the shards it holds now (a new
    replica holds none); `orphans`: the shards of removed replicas. Together they are every shard.
    A replica over its share gives up its highest shards; the freed shards go out in shard
    order, a contiguous run to each replica under its share, so ranges stay few.
    """
    names = list(owned)
    if sorted([*orphans, *(s for held in owned.values() for s in held)]) != list(range(shards)):
        raise ValueError("balance needs every shard exactly once among owned and orphans")
    base, extra = divmod(shards, len(names))
    # Stable sort: among replicas holding as many, the map's order decides who keeps the extra one.
    by_holding = sorted(names, key=lambda name: -len(owned[name]))
    share = {name: base + (1 if rank < extra else 0) for rank, name in enumerate(by_holding)}
    kept = {name: sorted(owned[name])[: share[name]] for name in names}
    freed = sorted([*orphans, *(s for name in names for s in sorted(owned[name])[share[name] :])])
    taken = 0
    for name in names:
        wanted = share[name] - len(kept[name])
        if wanted > 0:
            kept[name] = sorted(kept[name] + freed[taken : taken + wanted])
            taken += wanted
    return kept
