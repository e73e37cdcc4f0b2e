"""Which model version each stream is bound to, server-wide; the --max-streams limit and each
tenant's max_streams.

A stream is admitted when its first work is accepted (before its row exists), so that every later
reading of it is routed to the same model version, in order, even across a reload; it is withdrawn
when its row is deleted, or when the work that admitted it is refused before creating it. The map
is private: these verbs are the only way to change it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import repeat

from cellstream import metrics
from cellstream.errors import TooManyStreams, WrongModel, quoted
from cellstream.ids import SEP, local_id, tenant_of

ModelKey = tuple[str, str]  # (model name, version): one StateStore and one batcher each


class StreamDirectory:
    """stream id -> model version. Values are shared key tuples, so an entry costs one dict slot."""

    def __init__(self, max_streams: int = 0) -> None:
        self._owner: dict[str, ModelKey] = {}
        self.max_streams = max_streams
        # While streams migrate from an old version to a new one, entries already point at the
        # new one; the old version may still create or end streams its queued work names.
        self._successor: dict[ModelKey, ModelKey] = {}
        # Streams per (tenant, version), kept as streams are bound and unbound: ListModels and
        # a tenant's max_streams must not walk every stream. Tenant "" is the anonymous one.
        self._counts: Counter[tuple[str, ModelKey]] = Counter()
        self.tenant_limits: Mapping[str, int] = {}  # max_streams of the tenants that have one

    def count(self, tenant: str, key: ModelKey | None = None) -> int:
        """Streams of a tenant (on one version, or on all)."""
        if key is not None:
            return self._counts[(tenant, key)]
        return sum(n for (name, _), n in self._counts.items() if name == tenant)

    def _tally(self, keys: Sequence[str], key: ModelKey, sign: int) -> None:
        if SEP not in "".join(keys):  # (in C: no tenant's streams among them)
            self._counts[("", key)] += sign * len(keys)
            return
        for tenant, n in Counter(map(tenant_of, keys)).items():
            self._counts[(tenant, key)] += sign * n

    def check_tenant_room(self, new: Sequence[str]) -> None:
        """Refuse (TooManyStreams) streams to be bound that would take a tenant past its max_streams."""
        by_tenant = Counter(map(tenant_of, new)) if SEP in "".join(new) else {"": len(new)}
        for tenant, n in by_tenant.items():
            limit = self.tenant_limits.get(tenant, 0)
            held = self.count(tenant) if limit else 0
            if limit and held + n > limit:
                metrics.QUOTA_REJECTIONS.labels(limit="max_streams").inc()
                raise TooManyStreams(
                    f"tenant {tenant!r} holds {held} streams and its max_streams is {limit}: delete "
                    f"or end idle streams, or ask the operator to raise the limit"
                )

    def __len__(self) -> int:
        return len(self._owner)

    def key_of(self, stream_id: str) -> ModelKey | None:
        return self._owner.get(stream_id)

    def keys_of(self, stream_ids: Sequence[str]) -> list[ModelKey | None]:
        return list(map(self._owner.get, stream_ids))

    def model_of(self, stream_id: str) -> str | None:
        key = self._owner.get(stream_id)
        return None if key is None else key[0]

    def excess(self, adding: int = 0) -> int:
        """How many streams are (or would be, after `adding`) over --max-streams."""
        return max(0, len(self._owner) + adding - self.max_streams) if self.max_streams else 0

    def _accepted(self, key: ModelKey) -> tuple[ModelKey, ModelKey | None]:
        return key, self._successor.get(key)

    def admit(
        self, stream_ids: Sequence[str], key: ModelKey, *, defer_limit: bool = False, restoring: bool = False
    ) -> list[str]:
        """Bind streams to a model version, all or none; `defer_limit` leaves --max-streams to
        eviction; `restoring` (a snapshot at start) takes them past every limit.
        Returns the ids it bound (those not bound before). Set operations in C, not per id."""
        owner = self._owner
        bound = set(map(owner.get, stream_ids))
        accepted = {key, self._successor.get(key), None}
        if not bound <= accepted:
            for stream_id in stream_ids:
                other = owner.get(stream_id)
                if other not in accepted:
                    assert other is not None
                    raise WrongModel(
                        f"stream {quoted(local_id(stream_id))} is bound to model {other[0]!r}, not {key[0]!r}"
                    )
        if None not in bound:
            return []
        # (not `keys() - owner.keys()`: a set difference with a dict walks the whole dict)
        new = [stream_id for stream_id in dict.fromkeys(stream_ids) if stream_id not in owner]
        if self.tenant_limits and not restoring:
            self.check_tenant_room(new)
        if not defer_limit and not restoring and self.excess(len(new)):
            raise TooManyStreams(
                f"the server holds {len(owner)} streams and --max-streams is {self.max_streams}: "
                f"delete or end idle streams, raise the limit, or run with --evict lru"
            )
        owner.update(zip(new, repeat(key)))
        self._tally(new, key, 1)
        return new

    def withdraw(self, stream_ids: Sequence[str], key: ModelKey) -> None:
        """Unbind streams, but only those still bound to `key` (a reset may have moved one)."""
        owner = self._owner
        accepted = self._accepted(key)
        gone: dict[ModelKey, list[str]] = {}
        for stream_id in stream_ids:
            bound = owner.get(stream_id)
            if bound is not None and bound in accepted:
                del owner[stream_id]
                gone.setdefault(bound, []).append(stream_id)
        for bound, ids in gone.items():
            self._tally(ids, bound, -1)

    def move(self, stream_id: str, key: ModelKey) -> None:
        """Bind an existing stream to another version of its model (a reset onto the current one)."""
        old = self._owner.get(stream_id)
        if old is not None:
            self._tally([stream_id], old, -1)
        self._owner[stream_id] = key
        self._tally([stream_id], key, 1)

    def begin_migration(self, old: ModelKey, new: ModelKey) -> int:
        """Move every stream of one version to another; until `end_migration`, the old version may
        still create or end the streams its queued work names. Returns how many moved."""
        self._successor[old] = new
        moved = [stream_id for stream_id, key in self._owner.items() if key == old]
        self._owner.update(zip(moved, repeat(new)))
        for (tenant, key), n in list(self._counts.items()):
            if key == old:
                self._counts[(tenant, new)] += n
                del self._counts[(tenant, key)]
        return len(moved)

    def end_migration(self, old: ModelKey) -> None:
        self._successor.pop(old, None)
