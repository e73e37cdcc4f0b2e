"""Tenants: who a caller is (by its token), which models it may use, and its quotas.

The auth file names each tenant, the SHA-256 digests of its tokens (tokens themselves are never
stored), and its limits. A tenant's streams are keyed `name + SEP + id` (see ids.py), so two
tenants' `s1` are two streams; the anonymous tenant of a server without --auth-file keys streams
by their bare ids, as before tenants existed, and may do everything.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cellstream import metrics
from cellstream.errors import PermissionDenied, QuotaExceeded, quoted
from cellstream.ids import SEP, TENANT_NAME

TOKEN_PREFIX = "sha256:"
TENANT_KEYS = {"tokens", "models", "admin", "max_streams", "max_steps_per_second", "max_stream_calls"}
MAX_TOKENS = 10_000  # digests in one auth file: it is read into memory whole


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_line(token: str) -> str:
    """What the auth file holds for a token."""
    return TOKEN_PREFIX + hashlib.sha256(token.encode()).hexdigest()


class StepBucket:
    """A token bucket of readings: `rate` per second, holding at most one second's worth."""

    __slots__ = ("_clock", "_stamp", "rate", "tokens")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.tokens = rate
        self._clock = clock
        self._stamp = clock()

    def take(self, readings: int) -> bool:
        now = self._clock()
        self.tokens = min(self.rate, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if readings > self.tokens:
            return False
        self.tokens -= readings
        return True

    def give_back(self, readings: int) -> None:
        self.tokens = min(self.rate, self.tokens + readings)


class Usage:
    """What a tenant is using now; kept by name across auth-file reloads."""

    __slots__ = ("bucket", "stream_calls")

    def __init__(self) -> None:
        self.bucket: StepBucket | None = None
        self.stream_calls = 0


class Tenant:
    """One tenant as the auth file says (immutable), with its live usage."""

    __slots__ = (
        "admin",
        "max_steps_per_second",
        "max_stream_calls",
        "max_streams",
        "models",
        "name",
        "prefix",
        "usage",
    )

    def __init__(
        self,
        name: str,
        *,
        models: frozenset[str] | None = None,
        admin: bool = False,
        max_streams: int = 0,
        max_steps_per_second: float = 0.0,
        max_stream_calls: int = 0,
        usage: Usage | None = None,
    ) -> None:
        self.name = name
        self.prefix = name + SEP if name else ""
        self.models = models
        self.admin = admin
        self.max_streams = max_streams
        self.max_steps_per_second = max_steps_per_second
        self.max_stream_calls = max_stream_calls
        self.usage = usage or Usage()
        bucket = self.usage.bucket
        if not max_steps_per_second:
            self.usage.bucket = None
        elif bucket is None:
            self.usage.bucket = StepBucket(max_steps_per_second)
        else:
            bucket.rate = max_steps_per_second  # (a reload keeps what the tenant has spent)
            bucket.tokens = min(bucket.tokens, max_steps_per_second)

    def __repr__(self) -> str:
        return f"Tenant({self.name!r})"

    def key(self, stream_id: str) -> str:
        """The server's key of one of this tenant's stream ids."""
        return self.prefix + stream_id if self.prefix else stream_id

    def keys(self, stream_ids: Sequence[str]) -> list[str]:
        prefix = self.prefix
        return [prefix + stream_id for stream_id in stream_ids] if prefix else list(stream_ids)

    def owns(self, key: str) -> bool:
        """Whether a stream key is this tenant's (every key is an admin's to move)."""
        return key.startswith(self.prefix) if self.prefix else SEP not in key

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            metrics.AUTH_REJECTIONS.labels(reason="model_denied").inc()
            raise PermissionDenied(
                f"tenant {self.name!r} may not use model {quoted(model)}; its models: {sorted(self.models)}"
            )

    def check_admin(self, what: str) -> None:
        if not self.admin:
            metrics.AUTH_REJECTIONS.labels(reason="admin_only").inc()
            raise PermissionDenied(f"{what} needs an admin tenant; tenant {self.name!r} is not one")

    def charge(self, readings: int) -> None:
        """Take `readings` from the tenant's max_steps_per_second (RESOURCE_EXHAUSTED when out)."""
        bucket = self.usage.bucket
        if bucket is not None and not bucket.take(readings):
            metrics.QUOTA_REJECTIONS.labels(limit="max_steps_per_second").inc()
            if readings > bucket.rate:
                raise QuotaExceeded(
                    f"{readings} readings in one request are over tenant {self.name!r}'s "
                    f"max_steps_per_second {bucket.rate:g}: send fewer at a time"
                )
            raise QuotaExceeded(
                f"tenant {self.name!r} is at its max_steps_per_second {bucket.rate:g}: slow down and retry"
            )

    def refund(self, readings: int) -> None:
        """Give back a charge whose work was refused before it was queued."""
        if self.usage.bucket is not None:
            self.usage.bucket.give_back(readings)

    def open_stream_call(self) -> None:
        """Count a streaming call against max_stream_calls (RESOURCE_EXHAUSTED at the limit)."""
        usage = self.usage
        if self.max_stream_calls and usage.stream_calls >= self.max_stream_calls:
            metrics.QUOTA_REJECTIONS.labels(limit="max_stream_calls").inc()
            raise QuotaExceeded(
                f"tenant {self.name!r} has {usage.stream_calls} streaming calls open (StepStream, "
                f"ModelStreamInfer), its max_stream_calls: close one, or send more readings on each"
            )
        usage.stream_calls += 1

    def close_stream_call(self) -> None:
        self.usage.stream_calls -= 1


ANONYMOUS = Tenant("", admin=True)


class Tenants:
    """An auth file's tenants, by name and by token digest."""

    def __init__(self, tenants: Mapping[str, Tenant], digests: Mapping[bytes, Tenant]) -> None:
        self.by_name = dict(tenants)
        self.by_digest = dict(digests)

    def stream_limits(self) -> dict[str, int]:
        return {name: t.max_streams for name, t in self.by_name.items() if t.max_streams}


def parse_auth_file(data: bytes, previous: Tenants | None = None) -> Tenants:
    """Read an auth file strictly (unknown keys are typos, not ignored); `previous`: the tenants
    it replaces, whose usage (spent steps, open calls) carries over by name. Raises ValueError."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not JSON ({exc})") from None
    if not isinstance(document, dict) or set(document) != {"tenants"}:
        raise ValueError('must be one object {"tenants": {NAME: {"tokens": [...], ...}, ...}}')
    if not isinstance(document["tenants"], dict):
        raise ValueError('must be one object {"tenants": {NAME: {"tokens": [...], ...}, ...}}')
    tenants: dict[str, Tenant] = {}
    digests: dict[bytes, Tenant] = {}
    for name, entry in document["tenants"].items():
        where = f"tenant {quoted(name)}"
        if not TENANT_NAME.fullmatch(name):
            raise ValueError(
                f"{where}: a name is 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
            )
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = set(entry) - TENANT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(TENANT_KEYS)}")
        usage = previous.by_name[name].usage if previous is not None and name in previous.by_name else None
        steps = _limit(entry.get("max_steps_per_second", 0), f"{where}: max_steps_per_second")
        tenant = Tenant(
            name,
            models=_models(entry.get("models"), where),
            admin=_flag(entry.get("admin", False), where),
            max_streams=_limit(entry.get("max_streams", 0), f"{where}: max_streams"),
            max_steps_per_second=float(steps),
            max_stream_calls=_limit(entry.get("max_stream_calls", 0), f"{where}: max_stream_calls"),
            usage=usage,
        )
        for digest in _digests(entry.get("tokens"), where):
            other = digests.setdefault(digest, tenant)
            if other is not tenant:
                raise ValueError(f"{where}: a token of tenant {other.name!r} is listed again")
        tenants[name] = tenant
        if len(digests) > MAX_TOKENS:
            raise ValueError(f"holds over {MAX_TOKENS} tokens")
    return Tenants(tenants, digests)


def _digests(tokens: Any, where: str) -> list[bytes]:
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f'{where}: "tokens" must be a list of at least one "{TOKEN_PREFIX}<hex>"')
    found = []
    for token in tokens:
        valid = isinstance(token, str) and token.startswith(TOKEN_PREFIX)
        hex_digest = token[len(TOKEN_PREFIX) :] if valid else ""
        try:
            digest = bytes.fromhex(hex_digest)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError(
                f'{where}: tokens are "{TOKEN_PREFIX}" and 64 hex digits (from `cellstream auth '
                f"new-token`), never the token itself"
            )
        found.append(digest)
    return found


def _models(models: Any, where: str) -> frozenset[str] | None:
    if models is None:
        return None
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f'{where}: "models" must be a list of model names (omit it for every model)')
    return frozenset(models)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{where}: "admin" must be true or false')
    return value


def _limit(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ValueError(f"{where} must be a whole number, 0 for no limit")
    return value
