"""LLMEngine: requests in, tokens out. `step()` = schedule -> run the model -> sample -> update."""

from __future__ import annotations

import copy
import logging
import os
import time
import uuid
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmfleet.engine.block_manager import BlockManager
from lmfleet.engine.executor import ExecutorDied, TPExecutor
from lmfleet.engine.params import SamplingParams
from lmfleet.engine.runner import ModelRunner
from lmfleet.engine.sampler import Sampler, SampleResult
from lmfleet.engine.scheduler import Scheduler
from lmfleet.engine.sequence import Sequence
from lmfleet.engine.step import prepare_step
from lmfleet.errors import ConfigError
from lmfleet.model.checkpoint import resolve_device
from lmfleet.model.tokenizer import IncrementalDetokenizer, Tokenizer
from lmfleet.model.transformer import Transformer
from lmfleet.parallel.tensor_parallel import check_tp, tp_layout

log = logging.getLogger(__name__)

Prompt = str | abc.Sequence[int]


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None
    logprobs: list[dict[str, Any]] | None = None  # of every output token so far (a copy)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[str, Any]] | None = None  # of exactly the tokens in delta_token_ids


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float | None] = field(default_factory=dict)
    num_cached_tokens: int = 0
    error: str | None = None  # set when the engine failed this request (finished, finish_reason "error")

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


def kv_cache_budget(total: int, utilization: float, in_use: int, peak_activations: int) -> int:
    """Bytes left for the KV cache: the share `utilization` of the device's `total` memory, less what
    is in use (weights, other processes) and the peak a forward of the largest batch adds."""
    return int(total * utilization) - in_use - peak_activations


def _cpu_kv_bytes() -> int:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 * 1024**3
    return int(min(2 * 1024**3, available * 0.2))


def profile_peak_bytes(model: Transformer, num_tokens: int, num_logit_rows: int) -> int:
    """CUDA memory a forward of `num_tokens` tokens (one prefill of the largest step, logits for
    `num_logit_rows` rows) adds above what is allocated now."""
    device = model.embed_tokens.weight.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        hidden = model.hidden_states(torch.zeros(1, num_tokens, dtype=torch.long, device=device))
        model.lm_head(hidden[0, :num_logit_rows])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del hidden
    torch.cuda.empty_cache()
    return peak


class LLMEngine:
    def __init__(self, model: str | Path | Transformer, tokenizer: Tokenizer | None = None, *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 kv_cache_memory: int | None = None, num_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 dtype: str | torch.dtype = "fp32", device: str = "auto", max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, seed: int = 0, enforce_eager: bool = False,
                 linear_method: str = "auto"):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be >= 1")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        device = resolve_device(device)
        if isinstance(model, Transformer):
            # The runner rewrites layers for speed; keep the caller's model as it is.
            self.model = copy.deepcopy(model).eval()
        else:
            from lmfleet.model.checkpoint import load_model
            from lmfleet.model.tokenizer import load_tokenizer

            # With tensor parallelism the whole model stays in host memory: each rank slices it there
            # and moves only its slice to its device.
            self.model = load_model(model, dtype=dtype, device=device if tensor_parallel_size == 1 else "cpu")
            if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(model)
        self.tokenizer = tokenizer
        config = self.model.config
        check_tp(config, tensor_parallel_size)
        if tensor_parallel_size > 1:
            from lmfleet.compress.quantize import quantized_modules

            if quantized_modules(self.model):
                raise ConfigError("tensor_parallel_size > 1 with a quantized model is not supported yet: serve "
                                  "the floating-point model with tensor parallelism, or the quantized one on one rank")
        self.tensor_parallel_size = tensor_parallel_size
        kv_heads = tp_layout(config, tensor_parallel_size, 0).kv_heads  # per rank: its share of the cache
        self.max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        self.eos_ids = set(config.eos_token_ids) | (set(tokenizer.stop_ids) if tokenizer else set())
        # Where the model runs: a model directory goes to `device`; a model given keeps its own.
        run_device = device if not isinstance(model, Transformer) else self.model.embed_tokens.weight.device
        on_cuda = run_device.type == "cuda"
        if num_blocks is None:
            if not kv_cache_memory and on_cuda and tensor_parallel_size > 1:
                raise ConfigError("tensor_parallel_size > 1 on CUDA needs kv_cache_memory (bytes per rank) or "
                                  "num_blocks: the cache is not profiled per rank yet (`lmfleet info MODEL --tp N` "
                                  "gives each rank's weight and KV bytes)")
            budget = kv_cache_memory or self._kv_budget(gpu_memory_utilization, max_num_batched_tokens,
                                                        max_num_seqs) // tensor_parallel_size
            num_blocks = budget // ModelRunner.bytes_per_block(self.model, block_size, kv_heads)
        if num_blocks < 1:
            raise ConfigError(f"the KV cache budget holds no block of {block_size} tokens; raise kv_cache_memory "
                              f"(or gpu_memory_utilization on CUDA), or give num_blocks")
        capacity = num_blocks * block_size
        if capacity < self.max_model_len:
            # One full-context sequence must fit, or a request within the context (chat's default
            # max_tokens is the rest of it) would be refused for the server's memory.
            if max_model_len is not None:
                raise ConfigError(f"max_model_len={max_model_len} does not fit in the KV cache ({capacity} tokens "
                                  f"in {num_blocks} blocks); raise kv_cache_memory (or gpu_memory_utilization) "
                                  f"or lower max_model_len")
            log.warning("the KV cache holds %d tokens, fewer than the model's context of %d: max_model_len "
                        "lowered to %d (raise kv_cache_memory or gpu_memory_utilization for more)",
                        capacity, self.max_model_len, capacity)
            self.max_model_len = capacity
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        # CUDA graphs for decode-only steps on CUDA, unless enforce_eager: every shape captured now.
        runner_kwargs = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                             max_model_len=self.max_model_len, linear_method=linear_method,
                             cuda_graphs=on_cuda and not enforce_eager and tensor_parallel_size == 1)
        if tensor_parallel_size == 1:
            self.runner: ModelRunner | TPExecutor = ModelRunner(self.model, **runner_kwargs)
        else:
            self.runner = TPExecutor(self.model, tensor_parallel_size, runner_kwargs,
                                     model_dir=None if isinstance(model, Transformer) else model, dtype=dtype,
                                     device=run_device)
        self.runner.capture_graphs()
        self.sampler = Sampler(seed)
        self.requests: dict[str, _Request] = {}
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "failed": 0}

    def _kv_budget(self, utilization: float, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """KV-cache bytes: on CUDA, from a profiled forward of the largest step (as vLLM's
        gpu_memory_utilization); on CPU, a fifth of the available memory, at most 2 GiB (the caller divides
        it among tensor-parallel ranks, which share the host)."""
        device = self.model.embed_tokens.weight.device
        if device.type != "cuda":
            return _cpu_kv_bytes()
        profiled = min(max_num_batched_tokens, self.max_model_len)
        peak = profile_peak_bytes(self.model, profiled, max_num_seqs)
        free, total = torch.cuda.mem_get_info(device)
        budget = kv_cache_budget(total, utilization, total - free, peak)
        gib = 1024**3
        log.info("KV cache: %.2f GiB (gpu_memory_utilization %.2f of %.1f GiB; %.2f GiB in use, %.2f GiB peak "
                 "activations at %d tokens)", budget / gib, utilization, total / gib, (total - free) / gib,
                 peak / gib, profiled)
        if budget <= 0:
            raise ConfigError(f"gpu_memory_utilization={utilization} leaves no room for the KV cache: "
                              f"{(total - free) / gib:.2f} GiB in use and {peak / gib:.2f} GiB of activations of "
                              f"{total / gib:.1f} GiB; raise it or lower max_num_batched_tokens")
        return budget

    # ---- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this engine has no tokenizer: give prompts as token id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ConfigError("prompt token ids must be integers")
        vocab = self.model.config.vocab_size
        if not ids:
            raise ConfigError("prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def validate(self, prompt: Prompt, params: SamplingParams | None = None) -> list[int]:
        """The prompt's token ids, after checking the request fits this engine; raises ValueError
        (ConfigError) naming the problem. Reads only fixed settings, so any thread may call it."""
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ConfigError(f"max_tokens={params.max_tokens} exceeds the model's context of {self.max_model_len} "
                              f"minus {len(ids)} prompt tokens")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.model.config.vocab_size]
        if bad_stop:
            raise ConfigError(f"stop_token_ids {bad_stop} are outside the vocabulary")
        bad_bias = sorted(t for t in params.logit_bias if t >= self.model.config.vocab_size)
        if bad_bias:
            raise ConfigError(f"logit_bias token ids {bad_bias[:5]} are outside the vocabulary "
                              f"of {self.model.config.vocab_size}")
        return ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    validated: bool = False) -> str:
        """Queue a request; returns its id. Raises ValueError (ConfigError) for invalid input.
        `validated=True`: `prompt` is the id list `validate()` returned for these params."""
        params = params or SamplingParams()
        params.check()
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

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; nothing to do for one process)."""
        if isinstance(self.runner, TPExecutor):
            self.runner.shutdown()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, update. A failure that belongs to one request (its
        admission, its sampling, its detokenization) finishes that request with `error` set; a
        failed model forward finishes the step's requests so; the engine itself goes on."""
        batch = self.scheduler.schedule()
        failed = self.scheduler.take_failed()
        outputs = [self._fail(seq.request_id, exc) for seq, exc in failed]
        if failed:  # a failed request's other choices may already be in the batch: they must not run
            kept = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if s.request_id in self.requests]
            batch.seqs, batch.num_new_tokens = [s for s, _ in kept], [n for _, n in kept]
        if not batch:
            return [o for o in outputs if o is not None]
        try:
            meta, index = prepare_step(batch, self.runner.sort_decodes)
            logits = self.runner.execute(meta)
        except ExecutorDied:  # no step can run any more: the engine ends (a server exits non-zero)
            raise
        except Exception as exc:  # noqa: BLE001 - fail the step's requests, not the engine
            log.exception("the model step failed; failing its %d sequences", len(batch.seqs))
            outputs += [self._fail(rid, exc) for rid in dict.fromkeys(seq.request_id for seq in batch.seqs)]
            return [o for o in outputs if o is not None]
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            try:
                seq.num_computed_tokens += num_new
                self.block_manager.commit(seq)
            except Exception as exc:  # noqa: BLE001 - that request fails, the others go on
                outputs.append(self._fail(seq.request_id, exc))
        sampled = [batch.seqs[i] for i in index]
        touched: dict[str, None] = {}
        now = time.monotonic()
        for seq, result in zip(sampled, self._sample(logits, sampled)):
            if seq.request_id not in self.requests:  # failed earlier in this step (another choice)
                continue
            try:
                if isinstance(result, Exception):
                    raise result
                self._append(seq, result.token_id, result.logprob, now)
            except Exception as exc:  # noqa: BLE001 - that request fails, the others go on
                outputs.append(self._fail(seq.request_id, exc))
                continue
            touched[seq.request_id] = None
        outputs += [self._output(rid) for rid in touched if rid in self.requests]
        return [o for o in outputs if o is not None]

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
            # Copies: a consumer may read this output after later steps appended to the sequence.
            logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None
            out = CompletionOutput(seq.index, tokens, seq.text, seq.finish_reason, seq.stop_reason, logprobs,
                                   delta_text=seq.text[seq.sent_text:], delta_token_ids=tokens[seq.sent_tokens:],
                                   delta_logprobs=logprobs[seq.sent_tokens:] if logprobs is not None else None)
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
    def generate(self, prompts: Prompt | abc.Sequence[Prompt],
                 params: SamplingParams | abc.Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in prompt order. Every prompt is validated
        before any is queued (a bad one raises ValueError naming it, and nothing runs)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one or one per prompt")
        checked = []
        for number, (prompt, sp) in enumerate(zip(prompts, params)):
            try:
                checked.append(self.validate(prompt, sp))
            except ConfigError as exc:
                raise ConfigError(f"prompt {number}: {exc}") from None
        ids = [self.add_request(p, sp, validated=True) for p, sp in zip(checked, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult | Exception]:
        """The batch's tokens; if sampling the batch fails, each row alone, so only a bad row fails
        (seeded rows redraw from their generators' state before the failed attempt)."""
        states = [(seq, seq.generator.get_state() if seq.generator is not None else None) for seq in seqs]
        try:
            return self.sampler(logits, seqs)
        except Exception:  # noqa: BLE001
            for seq, state in states:
                if state is None:
                    seq.generator = None  # made (and maybe advanced) by the failed attempt: made again
                elif seq.generator is not None:
                    seq.generator.set_state(state)
            results: list[SampleResult | Exception] = []
            for row, seq in enumerate(seqs):
                try:
                    results.append(self.sampler(logits[row:row + 1], [seq])[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
            return results

    def _fail(self, request_id: str, exc: BaseException) -> RequestOutput | None:
        """Finish a request the engine failed: free its sequences and say why."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        log.warning("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                try:
                    self.scheduler.finish(seq)
                except Exception:  # noqa: BLE001 - its state is what failed; drop it from the queues
                    self.scheduler.discard(seq)
        self.stats["failed"] += 1
        outputs = [CompletionOutput(seq.index, seq.output_token_ids, seq.text, "error") for seq in request.seqs]
        return RequestOutput(request_id, request.prompt_token_ids, outputs, True,
                             {"arrival_time": request.arrival_time}, error=f"{type(exc).__name__}: {exc}")

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def running_status(self) -> dict[str, Any]:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_cache_usage": self.block_manager.usage, "prefix_queries": self.block_manager.prefix_queries,
                "prefix_hits": self.block_manager.prefix_hits, "preemptions": self.scheduler.num_preemptions}


