"""A large StepBatch's intake a chunk per turn of the event loop: its tenant's stream keys, row
look-ups, the ids' dict for its waves, and admission of its new streams (all or none). 100,000 ids
are 100,000 dict operations: done at once they would hold every other caller for a tenth of a
second or more."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from cellstream.batching.plan import Waves, one_wave, plan_waves, waves_of
from cellstream.streams.store import StateStore
from cellstream.tenants import Tenant


async def keys(tenant: Tenant, stream_ids: list[str], chunk: int) -> list[str]:
    """Tenant.keys, a chunk per loop turn."""
    scoped: list[str] = []
    for start in range(0, len(stream_ids), chunk):
        scoped += tenant.keys(stream_ids[start : start + chunk])
        await asyncio.sleep(0)
    return scoped


async def lookup(store: StateStore, stream_ids: list[str], chunk: int) -> np.ndarray:
    """StateStore.lookup, a chunk per loop turn (rows may go stale meanwhile: the batcher looks
    again unless no row was freed, see StateStore.rows_for)."""
    rows = np.empty(len(stream_ids), np.int64)
    for start in range(0, len(stream_ids), chunk):
        rows[start : start + chunk] = store.lookup(stream_ids[start : start + chunk])
        await asyncio.sleep(0)
    return rows


async def waves(stream_ids: list[str], rows: np.ndarray | None, chunk: int) -> Waves:
    """plan_waves, with the dict of ids (when rows are not all known) built a chunk per turn."""
    if rows is not None:
        return plan_waves(stream_ids, rows)  # (numpy only)
    last: dict[str, int] = {}
    n = len(stream_ids)
    for start in range(0, n, chunk):
        part = stream_ids[start : start + chunk]
        last.update(zip(part, range(start, start + len(part)), strict=True))
        await asyncio.sleep(0)
    if len(last) == n:
        return one_wave(n)
    codes = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        part = stream_ids[start : start + chunk]
        codes[start : start + len(part)] = np.fromiter(map(last.__getitem__, part), np.int64, len(part))
        await asyncio.sleep(0)
    return waves_of(codes)


async def admit(store: StateStore, stream_ids: list[str], chunk: int, recheck: Callable[[], None]) -> None:
    """Admit a checked batch's streams a chunk per turn, all or none: if a chunk is refused, or
    `recheck` (run once all are in) raises, the streams admitted here are withdrawn again."""
    admitted: list[str] = []
    try:
        for start in range(0, len(stream_ids), chunk):
            admitted += store.admit(stream_ids[start : start + chunk])
            await asyncio.sleep(0)
        recheck()
    except BaseException:
        store.forget_unstarted(admitted)
        raise
