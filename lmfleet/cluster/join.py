"""Connecting to Ray: start a local Ray, or join a cluster after checking, in a second or two, that
it is there and that its token authentication (Ray 2.60's default) will let this process in.
Without the check, `ray.init` retries for a minute and ends in a traceback.

Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
~/.ray/auth_token, and sends it only in token mode: RAY_AUTH_MODE=token, which Ray turns on by
itself only for `--ray-address auto` (a cluster on this node) when a token is there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lmfleet.errors import ConfigError

AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
NAMESPACE = "lmfleet"
PROBE_TIMEOUT_S = 5.0
# A cheap call every GCS answers; under token authentication it needs the token.
PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def token_source(env: Mapping[str, str]) -> tuple[str, str | None]:
    """Where Ray will read the token from (in Ray's order) and the token, None when there is none."""
    if env.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV, env[TOKEN_ENV].strip()
    path = Path(env[TOKEN_PATH_ENV]) if env.get(TOKEN_PATH_ENV) else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    return str(path), token or None


def probe(address: str, token: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """'ok', 'unauthenticated', or why the cluster's GCS at `address` did not answer."""
    import grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PROBE_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return "unauthenticated"
            return f"{exc.code().name.lower()}: {(exc.details() or '')[:120]}"
    return "ok"


def _resolve(address: str) -> str | None:
    """host:port of the GCS for `address` as Ray reads it ('auto': the cluster on this node), None
    when there is none to ask (ray.init then says so itself, at once)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except ValueError as exc:
        raise ConfigError(f"--ray-address {address!r}: {exc}; give HOST:PORT or auto") from None
    except Exception:  # noqa: BLE001 - e.g. 'auto' with no local cluster
        return None


def check_join(address: str, env: Mapping[str, str] | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """ConfigError (one line, in seconds) when joining the Ray cluster at `address` would fail: nothing
    answers there, or its token authentication would refuse this process."""
    env = os.environ if env is None else env
    if address.startswith("ray://"):
        return  # Ray Client: its own protocol and errors
    if env.get("RAY_USE_TLS", "").strip().lower() in ("1", "true", "yes"):
        return  # the probe speaks plain gRPC; a TLS cluster is left to ray.init and its own errors
    target = _resolve(address)
    if target is None:
        return
    source, token = token_source(env)
    mode = env.get(AUTH_MODE_ENV, "").strip().lower()
    if not mode:
        mode = "token" if address == "auto" and token else "disabled"
    if mode == "token" and token is None:
        raise ConfigError(f"{AUTH_MODE_ENV}=token but no Ray token was found in {source}: copy the cluster's "
                          f"token there (the head node's ~/.ray/auth_token) or set {TOKEN_ENV}")
    answer = probe(target, None, timeout_s)
    if answer == "ok":
        return
    if answer != "unauthenticated":
        raise ConfigError(f"no Ray cluster answers at {address} ({answer}); start one with `ray start --head` "
                          "or check --ray-address")
    if mode != "token":
        raise ConfigError(f"the Ray cluster at {address} requires token authentication: set {AUTH_MODE_ENV}=token "
                          f"with the cluster's token in {source} (or in {TOKEN_ENV} / {TOKEN_PATH_ENV})")
    if probe(target, token, timeout_s) == "unauthenticated":
        raise ConfigError(f"the Ray cluster at {address} rejected the token in {source} ({AUTH_MODE_ENV}=token): "
                          "copy the head node's ~/.ray/auth_token there, or set the right one in "
                          f"{TOKEN_ENV}")


def connect(address: str | None) -> None:
    """Start a local Ray (`address` None) or join the cluster at `address`, once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_join(address)
    auth_error = getattr(ray.exceptions, "AuthenticationError", ConnectionError)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
                 configure_logging=False)
    except auth_error as exc:
        raise ConfigError(f"Ray token authentication: {str(exc).splitlines()[0][:300]}") from None
    except ConnectionError as exc:
        raise ConfigError(f"no Ray cluster at {address!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
