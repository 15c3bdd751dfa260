"""LLMEngine: requests in, tokens out. `step()` = schedule -> run the model -> sample -> update."""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmfleet.engine.block_manager import BlockManager
from lmfleet.engine.params import SamplingParams
from lmfleet.engine.runner import ModelRunner
from lmfleet.engine.sampler import Sampler
from lmfleet.engine.scheduler import Scheduler
from lmfleet.engine.sequence import Sequence
from lmfleet.errors import ConfigError
from lmfleet.model.checkpoint import resolve_device
from lmfleet.model.tokenizer import IncrementalDetokenizer, Tokenizer
from lmfleet.model.transformer import Transformer


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None
    logprobs: list[dict[str, Any]] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float | None] = field(default_factory=dict)
    num_cached_tokens: int = 0

    # The first (usually only) completion, as in `outs[0].token_ids`.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    arrival_time: float
    sent_tokens: list[int] = field(default_factory=list)


def _default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 * 1024**3
    return int(min(2 * 1024**3, available * 0.2))


class LLMEngine:
    def __init__(self, model: str | Path | Transformer, tokenizer: Tokenizer | None = None, *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 kv_cache_memory: int | None = None, num_blocks: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 dtype: str | torch.dtype = "fp32", device: str = "auto", max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, seed: int = 0, enforce_eager: bool = False):
        if tensor_parallel_size != 1:
            raise ConfigError(f"tensor_parallel_size={tensor_parallel_size}: only 1 is supported so far")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be >= 1")
        device = resolve_device(device)
        if isinstance(model, Transformer):
            # The runner rewrites layers for speed; keep the caller's model as it is.
            self.model = copy.deepcopy(model).eval()
        else:
            from lmfleet.model.checkpoint import load_model
            from lmfleet.model.tokenizer import load_tokenizer

            self.model = load_model(model, dtype=dtype, device=device)
            if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(model)
        self.tokenizer = tokenizer
        config = self.model.config
        self.max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        self.eos_ids = set(config.eos_token_ids) | (set(tokenizer.stop_ids) if tokenizer else set())
        if num_blocks is None:
            budget = kv_cache_memory or _default_kv_bytes(self.model.embed_tokens.weight.device)
            num_blocks = budget // ModelRunner.bytes_per_block(self.model, block_size)
        if num_blocks < 1:
            raise ConfigError(f"the KV cache budget holds no block of {block_size} tokens; raise kv_cache_memory")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        # CUDA graphs for decode-only steps on CUDA, unless enforce_eager.
        self.runner = ModelRunner(self.model, num_blocks, block_size, max_num_seqs, self.max_model_len,
                                  cuda_graphs=self.model.embed_tokens.weight.is_cuda and not enforce_eager)
        self.sampler = Sampler(seed)
        self.requests: dict[str, _Request] = {}
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0}

    # ---- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this engine has no tokenizer: give prompts as token id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ConfigError("prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def validate(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> list[int]:
        """The prompt's token ids, after checking the request fits this engine; raises ValueError
        (ConfigError) naming the problem. Reads only fixed settings, so any thread may call it."""
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ConfigError(f"max_tokens={params.max_tokens} exceeds the model's context of {self.max_model_len} "
                              f"minus {len(ids)} prompt tokens")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + params.max_tokens > capacity:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_tokens={params.max_tokens} exceeds the KV cache "
                              f"({capacity} tokens); raise kv_cache_memory")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.model.config.vocab_size]
        if bad_stop:
            raise ConfigError(f"stop_token_ids {bad_stop} are outside the vocabulary")
        return ids

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    validated: bool = False) -> str:
        """Queue a request; returns its id. Raises ValueError (ConfigError) for invalid input.
        `validated=True`: `prompt` is the id list `validate()` returned for these params."""
        params = params or SamplingParams()
        ids = list(prompt) if validated else self.validate(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ConfigError(f"request_id {request_id!r} is already in use")
        arrival = arrival_time or time.monotonic()
        seqs = [Sequence(request_id, ids, params, arrival_time=arrival, index=i) for i in range(params.n)]
        for sibling in seqs[1:]:
            sibling.leader = seqs[0]
        detoks = [self.tokenizer.detokenizer(params.skip_special_tokens) if self.tokenizer else None for _ in seqs]
        self.requests[request_id] = _Request(request_id, ids, seqs, detoks, arrival)
        for seq in seqs:
            self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, rows = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        sampled = [batch.seqs[i] for i in rows]
        touched: dict[str, None] = {}
        now = time.monotonic()
        for seq, result in zip(sampled, self.sampler(logits, sampled)):
            self._append(seq, result.token_id, result.logprob, now)
            touched[seq.request_id] = None
        return [self._output(rid) for rid in touched if rid in self.requests]

    def _append(self, seq: Sequence, token: int, logprob: dict[str, Any] | None, now: float) -> None:
        seq.token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        self.stats["generation_tokens"] += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        request = self.requests[seq.request_id]
        detok = request.detoks[seq.index]
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", (token if token in p.stop_token_ids else None)
        elif detok is not None:
            seq.pending_text += detok.add(token)
            if self._check_stop_strings(seq):
                seq.finish_reason = "stop"
        if seq.finish_reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if seq.stop_reason is None or not isinstance(seq.stop_reason, str):
                if detok is not None and seq.finish_reason == "length":
                    seq.pending_text += detok.flush()
                seq.text += seq.pending_text
                seq.pending_text = ""
            seq.finished_time = now
            self.scheduler.finish(seq)
            self.stats["finished"] += 1
        else:
            self._release_safe_text(seq)

    def _check_stop_strings(self, seq: Sequence) -> bool:
        if not seq.params.stop:
            return False
        longest = max(len(s) for s in seq.params.stop)
        tail_start = max(0, len(seq.text) - longest + 1)
        window = seq.text[tail_start:] + seq.pending_text
        hits = [(window.find(s), s) for s in seq.params.stop if s in window]
        if not hits:
            return False
        pos, stop = min(hits)
        combined = seq.text[:tail_start] + window[:pos]
        seq.text, seq.pending_text, seq.stop_reason = combined, "", stop
        return True

    def _release_safe_text(self, seq: Sequence) -> None:
        """Move text that can no longer be the start of a stop string from pending to emitted."""
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        if hold == 0:
            seq.text += seq.pending_text
            seq.pending_text = ""
        elif len(seq.pending_text) > hold:
            seq.text += seq.pending_text[:-hold]
            seq.pending_text = seq.pending_text[-hold:]

    def _output(self, request_id: str) -> RequestOutput:
        request = self.requests[request_id]
        outputs = []
        for seq in request.seqs:
            tokens = seq.output_token_ids
            out = CompletionOutput(seq.index, tokens, seq.text, seq.finish_reason, seq.stop_reason,
                                   seq.logprobs if seq.params.logprobs is not None else None,
                                   delta_text=seq.text[seq.sent_text:], delta_token_ids=tokens[seq.sent_tokens:])
            seq.sent_text, seq.sent_tokens = len(seq.text), len(tokens)
            outputs.append(out)
        finished = all(s.is_finished for s in request.seqs)
        first = request.seqs[0]
        metrics = {"arrival_time": request.arrival_time, "scheduled_time": first.scheduled_time,
                   "first_token_time": first.first_token_time,
                   "finished_time": max((s.finished_time or 0) for s in request.seqs) if finished else None}
        result = RequestOutput(request_id, request.prompt_token_ids, outputs, finished, metrics,
                               num_cached_tokens=first.num_cached_tokens)
        if finished:
            del self.requests[request_id]
        return result

    # ---- offline -----------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one or one per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def running_status(self) -> dict[str, Any]:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_cache_usage": self.block_manager.usage, "prefix_queries": self.block_manager.prefix_queries,
                "prefix_hits": self.block_manager.prefix_hits, "preemptions": self.scheduler.num_preemptions}


