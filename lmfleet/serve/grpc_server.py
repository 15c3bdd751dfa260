"""The `lmfleet.v1` gRPC API (`proto/generation.proto`), served from the same process and engine
as the HTTP API, with the same keys, limits and validation, and the standard gRPC health service.

The Python modules are generated from the .proto when first imported (grpcio-tools), so they
always match the installed protobuf runtime.
"""

from __future__ import annotations

import importlib.resources
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lmfleet.errors import ConfigError


def load_protos() -> tuple[Any, Any]:
    """(messages module, services module) of lmfleet.v1."""
    try:
        import grpc
    except ImportError:
        raise ConfigError("gRPC needs the grpc extra: pip install 'lmfleet[grpc]'") from None
    # The proto is resolved against sys.path: put the folder that holds the installed `lmfleet`
    # package there (an editable install's CLI does not have the source tree on sys.path).
    root = str(Path(str(importlib.resources.files("lmfleet"))).parent)
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        return grpc.protos_and_services("lmfleet/serve/proto/generation.proto")
    except ImportError as exc:
        raise ConfigError(f"cannot build the gRPC modules ({exc}); pip install 'lmfleet[grpc]'") from None
    finally:
        if added:
            sys.path.remove(root)


def _status_of(http_status: int) -> Any:
    import grpc

    return {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
            404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}.get(
        http_status, grpc.StatusCode.INTERNAL)


def make_servicer(front: Any) -> Any:
    """A Generation servicer over the HTTP app's Frontend."""
    from lmfleet.engine.async_engine import EngineDeadError, RequestFailedError
    from lmfleet.serve.frontend import APIError
    from lmfleet.serve.protocol import finish_reason

    pb, services = load_protos()

    class GenerationServicer(services.GenerationServicer):
        async def _fail(self, context: Any, exc: APIError) -> None:
            front.metrics.http_errors.labels(front.settings.model_name, str(exc.status)).inc()
            await context.abort(_status_of(exc.status), exc.message)

        def _params(self, request: Any, ids: list[int], e: Any) -> Any:
            from lmfleet.engine import SamplingParams

            o = request.sampling
            has = o.HasField
            return SamplingParams(
                max_tokens=front.default_max_tokens(e, o.max_tokens if has("max_tokens") else None, ids),
                temperature=o.temperature if has("temperature") else 1.0, top_p=o.top_p if has("top_p") else 1.0,
                top_k=o.top_k if has("top_k") else 0, min_p=o.min_p if has("min_p") else 0.0,
                repetition_penalty=o.repetition_penalty if has("repetition_penalty") else 1.0,
                presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
                seed=o.seed if has("seed") else None, stop=list(o.stop), stop_token_ids=list(o.stop_token_ids),
                ignore_eos=o.ignore_eos, logprobs=o.logprobs if has("logprobs") else None, priority=o.priority)

        async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
            metadata = dict(context.invocation_metadata() or ())
            try:
                front.authorize(metadata.get("authorization"))
                e = front.admit(request.model or None)
                kind = request.WhichOneof("prompt")
                if kind is None:
                    raise APIError(400, "prompt is required: set text or token_ids", param="prompt")
                prompt = request.text if kind == "text" else list(request.token_ids.ids)
                (stream,) = await front.start(e, [prompt], lambda ids: self._params(request, ids, e))
            except APIError as exc:
                await self._fail(context, exc)
                return
            try:
                async for out in stream:
                    c = out.outputs[0]
                    reply = pb.GenerateResponse(request_id=out.request_id, token_ids=c.delta_token_ids,
                                                text=c.delta_text, finish_reason=finish_reason(c) or "")
                    if c.delta_logprobs:
                        for entry in c.delta_logprobs:
                            reply.logprobs.add(token_id=entry["token_id"], logprob=entry["logprob"],
                                               top=[pb.TopLogprob(token_id=t, logprob=lp)
                                                    for t, lp in entry.get("top", [])])
                    if out.finished:
                        reply.usage.prompt_tokens = len(out.prompt_token_ids)
                        reply.usage.completion_tokens = len(c.token_ids)
                        front.metrics.finished(out.metrics, finish_reason(c))
                    yield reply
            except EngineDeadError as exc:
                await self._fail(context, APIError(503, str(exc), code="engine_dead"))
            except RequestFailedError as exc:
                await self._fail(context, APIError(500, str(exc), code="request_failed"))
            finally:
                stream.close()  # a cancelled call (client gone) aborts the request

        async def Models(self, request: Any, context: Any) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            try:
                front.authorize(metadata.get("authorization"))
            except APIError as exc:
                await self._fail(context, exc)
                return None
            card = pb.ModelCard(id=front.settings.model_name)
            if front.engine is not None:
                card.max_model_len = front.engine.engine.max_model_len
            return pb.ModelsResponse(models=[card])

    return GenerationServicer()


async def start_grpc(front: Any, host: str, port: int, ssl_keyfile: str | None = None,
                     ssl_certfile: str | None = None) -> Any:
    """Start the gRPC server on the running event loop (TLS when given the key and certificate);
    returns it (call `.stop(grace)`)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    _, services = load_protos()
    server = grpc.aio.server()
    services.add_GenerationServicer_to_server(make_servicer(front), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if ssl_keyfile and ssl_certfile:
        with open(ssl_keyfile, "rb") as key, open(ssl_certfile, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise ConfigError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()

    import asyncio

    async def track_health() -> None:  # SERVING once the engine is ready, NOT_SERVING when it is not
        while True:
            try:
                front.ready_engine()
                status = health_pb2.HealthCheckResponse.SERVING
            except Exception:  # noqa: BLE001 - any failure means not serving
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", "lmfleet.v1.Generation"):
                await health_servicer.set(name, status)
            await asyncio.sleep(0.5)

    task = asyncio.get_running_loop().create_task(track_health())
    original_stop = server.stop

    async def stop(grace: float | None = None) -> None:
        task.cancel()
        await original_stop(grace)

    server.stop = stop
    return server
