"""The inference engine: paged KV cache, continuous batching, prefix caching, sampling."""

from lmfleet.engine.async_engine import AsyncLLMEngine, EngineDeadError
from lmfleet.engine.engine import CompletionOutput, LLMEngine, RequestOutput
from lmfleet.engine.params import SamplingParams

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineDeadError", "LLMEngine", "RequestOutput", "SamplingParams"]
