"""The inference engine: paged KV cache, continuous batching, prefix caching, sampling."""

from lmfleet.engine.engine import CompletionOutput, LLMEngine, RequestOutput
from lmfleet.engine.params import SamplingParams

__all__ = ["CompletionOutput", "LLMEngine", "RequestOutput", "SamplingParams"]
