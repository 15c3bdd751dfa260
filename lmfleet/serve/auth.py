"""API keys and per-key request-rate limits."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from lmfleet.errors import ConfigError

API_KEY_ENV = "LMFLEET_API_KEY"  # one key, or several separated by commas


def load_api_keys(keys: Iterable[str] = (), key_file: str | Path | None = None,
                  env: dict[str, str] | None = None) -> list[str]:
    """Keys from flags, the LMFLEET_API_KEY variable (comma-separated) and a file (one per line,
    `#` comments). An empty list means the server is open."""
    env = os.environ if env is None else env
    found = [k.strip() for k in keys if k.strip()]
    found += [k.strip() for k in env.get(API_KEY_ENV, "").split(",") if k.strip()]
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise ConfigError(f"--api-key-file {path}: no such file")
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                found.append(line)
    short = [k for k in found if len(k) < 8]
    if short:
        raise ConfigError(f"{len(short)} API key(s) shorter than 8 characters; use longer random keys")
    return list(dict.fromkeys(found))


def open_exposure_warning(host: str, keys: list[str]) -> str | None:
    """A warning when a server without API keys listens beyond this machine (None otherwise)."""
    import ipaddress

    if keys or host in ("localhost", "ip6-localhost"):
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name other than localhost: it may resolve to any interface
    return (f"serving on {host} without API keys: anyone who can reach this port can use the model; "
            f"set {API_KEY_ENV} or --api-key-file (or bind 127.0.0.1)")


class KeyChecker:
    """Constant-time comparison against every configured key (digests of equal length, and every
    key compared whatever matches, so timing tells nothing about the keys)."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def from_digests(cls, digests: Iterable[str]) -> KeyChecker:
        """A checker from the keys' SHA-256 hex digests (see `digests`), for a process that must not
        hold the keys themselves."""
        checker = cls(())
        checker._digests = [bytes.fromhex(d) for d in digests]
        return checker

    def digests(self) -> list[str]:
        """The SHA-256 hex digests of the keys: what `from_digests` takes."""
        return [d.hex() for d in self._digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The matching key's id (a short digest prefix) for `Authorization: Bearer KEY`, else None."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():  # auth schemes are case-insensitive (RFC 9110)
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        match = None
        for known in self._digests:
            if hmac.compare_digest(known, digest):
                match = known
        return match.hex()[:12] if match is not None else None


class RateLimiter:
    """A token bucket per key: `rate` requests per second sustained, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int | None = None):
        if rate <= 0:
            raise ConfigError(f"--rate-limit {rate} must be > 0 requests per second")
        self.rate = rate
        self.burst = burst or max(1, int(rate))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 if the request may go now, else the seconds until it could."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


OPEN_PATHS = ("/health", "/version")  # answered without a key: probes and version checks


def is_console(path: str) -> bool:
    """The web console's static files (/ui, /ui/...): no secret in them, served without a key."""
    return path == "/ui" or path.startswith("/ui/")


def needs_key(path: str, protect_metrics: bool) -> bool:
    """Whether a request to `path` must carry a valid API key (when the server has keys)."""
    return path not in OPEN_PATHS and not is_console(path) and (path != "/metrics" or protect_metrics)


def rate_limited(path: str) -> bool:
    """Whether a request to `path` counts against its key's request rate (scrapes and the console's
    polling of /v1/stats do not: they start no generation)."""
    return path not in ("/metrics", "/v1/stats")
