"""Where `lmfleet recsys serve` keeps the interactions posted to /v1/events.

A user's history is the dataset's sequence (read-only, loaded by every replica) followed by the
events posted since, of which the newest `max_events` are kept. `MemoryHistoryStore` holds the
events in the process; `RedisHistoryStore` keeps them in Redis lists, so that every replica
reads what any of them wrote. An event is acknowledged only once the store has it; a store that
cannot be reached raises `StoreUnavailable` (the server answers 503 and the client retries).

An event may carry a client-chosen id: the store remembers the ids it appended (per user, with a
digest of the items; the newest `DEDUP_EVENTS` in memory, `DEDUP_TTL_S` in Redis), so a retry of
an event whose answer was lost (a timeout) is acknowledged without being appended twice, and an
id reused for other items is refused (`EventConflict`) rather than silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import urlparse

from lmfleet.errors import ConfigError, LmfleetError


class StoreUnavailable(LmfleetError):
    """The history store cannot be reached: the operation did not happen (retry)."""


class StoreTimeout(LmfleetError):
    """The history store did not answer in time: a write may or may not have happened."""


class StoreError(LmfleetError):
    """The history store refused the operation (a reply error: wrong type, auth, read-only...)."""


class EventConflict(LmfleetError):
    """An event id already appended for this user with other items: nothing was written."""

    def __init__(self, event_id: str):
        super().__init__(f"event_id {event_id!r} was already used for other items")


PASSWORD_ENV = "LMFLEET_REDIS_PASSWORD"  # the Redis password, when the URL carries none
DEDUP_EVENTS = 100_000  # event ids the in-memory store remembers (all users together; ~150 MB at most)
DEDUP_TTL_S = 24 * 3600  # how long Redis remembers an event id


def items_digest(items: list[str]) -> str:
    """What an event id remembers of its items (to tell a retry from a reuse)."""
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


class HistoryStore:
    """Events per user id: the original item ids, oldest first (so they outlive a retrained model)."""

    max_events: int
    blocking = True  # its calls do I/O: the server makes them on a worker thread

    def append(self, user: str, items: list[str], event_id: str | None = None) -> tuple[int, bool]:
        """Append `items` to `user`'s events atomically, unless `event_id` was appended before for
        this user (with the same items; with others: EventConflict); (the number of events now
        kept, whether it was such a repeat)."""
        raise NotImplementedError

    def events(self, users: list[str]) -> list[list[str]]:
        raise NotImplementedError

    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot answer."""

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryHistoryStore(HistoryStore):
    """Events in this process, lost when it stops; beyond `max_users` users with events, the least
    recently active one's events go (a bounded cache: use Redis to keep every user)."""

    blocking = False

    def __init__(self, max_events: int, max_users: int = 1_000_000):
        self.max_events, self.max_users = max_events, max_users
        self._events: OrderedDict[str, list[str]] = OrderedDict()
        self._seen: OrderedDict[tuple[str, str], str] = OrderedDict()  # (user, event id) -> items digest
        self._lock = threading.Lock()

    def append(self, user: str, items: list[str], event_id: str | None = None) -> tuple[int, bool]:
        with self._lock:
            if event_id is not None:
                digest = items_digest(items)
                seen = self._seen.get((user, event_id))
                if seen is not None:
                    if seen != digest:
                        raise EventConflict(event_id)
                    return len(self._events.get(user, ())), True
                self._seen[(user, event_id)] = digest
                if len(self._seen) > DEDUP_EVENTS:
                    self._seen.popitem(last=False)
            kept = self._events.get(user)
            if kept is None:
                while len(self._events) >= self.max_users:
                    self._events.popitem(last=False)
                kept = self._events[user] = []
            else:
                self._events.move_to_end(user)
            kept.extend(items)
            del kept[:-self.max_events]
            return len(kept), False

    def events(self, users: list[str]) -> list[list[str]]:
        with self._lock:
            return [list(self._events.get(u, ())) for u in users]

    def describe(self) -> str:
        return f"memory (up to {self.max_events} events per user, {self.max_users:,} users)"


# KEYS: the user's event list [, the event id's key]; ARGV: max events, id TTL, items digest, items.
# A known id answers before anything is written; the id is recorded only after the items are (a
# failing RPUSH leaves no id behind, so its retry is not mistaken for a repeat).
APPEND_SCRIPT = """
if #KEYS == 2 then
  local seen = redis.call('GET', KEYS[2])
  if seen then
    if seen ~= ARGV[3] then return {redis.call('LLEN', KEYS[1]), 2} end
    return {redis.call('LLEN', KEYS[1]), 1}
  end
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
if #KEYS == 2 then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2]) end
return {redis.call('LLEN', KEYS[1]), 0}
"""


class RedisHistoryStore(HistoryStore):
    """Events in Redis lists `<prefix>:events:<user>`, appended (RPUSH, LTRIM, and the event id's
    digest of its items under `<prefix>:event:<len(user)>:<user>:<event id>`, expiring) by one Lua
    script, which Redis runs atomically; LRANGE to read."""

    def __init__(self, url: str, max_events: int, prefix: str, timeout_s: float = 1.0):
        try:
            import redis
        except ImportError:
            raise ConfigError("--history-store redis://...: the redis client is not installed "
                              "(pip install 'lmfleet[redis]')") from None
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ConfigError(f"--history-store {url!r}: give redis://HOST:PORT/DB (or rediss:// for TLS)")
        self.url, self.max_events, self.prefix, self.timeout_s = url, max_events, prefix, timeout_s
        self._redis = redis
        password = None if parsed.password else os.environ.get(PASSWORD_ENV) or None
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False, password=password)
        self._append = self.client.register_script(APPEND_SCRIPT)

    def _key(self, user: str) -> str:
        return f"{self.prefix}:events:{user}"

    def _call(self, what: str, fn: Any) -> Any:
        errors = self._redis.exceptions
        try:
            return fn()
        except errors.TimeoutError:
            raise StoreTimeout(f"the history store did not answer the {what} within {self.timeout_s:g} s") from None
        except errors.ConnectionError as exc:
            raise StoreUnavailable(f"the history store is unavailable ({what}: {type(exc).__name__})") from None
        except errors.RedisError as exc:
            raise StoreError(f"the history store refused the {what}: {str(exc)[:200]}") from None

    def _safe_url(self) -> str:
        parsed = urlparse(self.url)
        return f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 6379}{parsed.path or ''}"

    def append(self, user: str, items: list[str], event_id: str | None = None) -> tuple[int, bool]:
        # The user's length in the id key keeps ("a:b", "c") and ("a", "b:c") apart.
        keys = [self._key(user)]
        if event_id is not None:
            keys.append(f"{self.prefix}:event:{len(user)}:{user}:{event_id}")

        def run() -> tuple[int, int]:
            kept, status = self._append(keys=keys, args=[self.max_events, DEDUP_TTL_S, items_digest(items), *items])
            return int(kept), int(status)

        kept, status = self._call("append", run)
        if status == 2:
            raise EventConflict(event_id)
        return kept, status == 1

    def events(self, users: list[str]) -> list[list[str]]:
        def run() -> list[list[str]]:
            pipe = self.client.pipeline(transaction=False)
            for user in users:
                pipe.lrange(self._key(user), -self.max_events, -1)
            return [[v.decode("utf-8", "replace") for v in values] for values in pipe.execute()]

        return self._call("read", run)

    def ping(self) -> None:
        self._call("ping", self.client.ping)

    def describe(self) -> str:
        return (f"redis {self._safe_url()} (up to {self.max_events} events per user, keys {self.prefix}:events:* "
                f"and event ids {self.prefix}:event:*)")

    def close(self) -> None:
        self.client.close()


def open_store(url: str | None, max_events: int, prefix: str, max_users: int = 1_000_000) -> HistoryStore:
    """None or 'memory': this process; redis://HOST:PORT/DB: shared by every replica."""
    if url is None or url == "memory":
        return MemoryHistoryStore(max_events, max_users)
    if url.startswith(("redis://", "rediss://")):
        return RedisHistoryStore(url, max_events, prefix)
    raise ConfigError(f"--history-store {url!r}: give 'memory' or redis://HOST:PORT/DB")
