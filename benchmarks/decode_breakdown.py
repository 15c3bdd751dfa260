"""Where a batch-1 decode step's time goes, lmfleet's engine vs Hugging Face on the same weights:
milliseconds per step split into the layers' matmuls, the output head, and everything else.

A step's time is (T(n tokens) - T(1 token)) / (n - 1) for a greedy request of n tokens after a
32-token prompt, the best of --repeats runs, the two sides taking turns. The matmul shares come
from replaying every linear module on the very input it saw during one decode step (recorded by a
forward hook): the layers' linears one whole pass in model order at a time, the head alone.
"Everything else" is the rest (attention, norms, RoPE, dispatch, the
engine's scheduling and sampling).

    python benchmarks/decode_breakdown.py --flavor small
    python benchmarks/decode_breakdown.py --flavor small --model-set hidden_size=896 ...   # ~0.5B
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import transformers
from torch import nn

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.model import ModelConfig, build_model, save_model

LINEARS = ("Linear", "PackedLinear", "TransposedLinear", "RowAdaptiveLinear")


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost linear-like modules by name (a RowAdaptiveLinear's own children are skipped)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in LINEARS and not any(name.startswith(f"{k}.") for k in found):
            found[name] = module
    return found


def record_inputs(modules: dict[str, nn.Module], run) -> dict[str, torch.Tensor]:
    """The last input each module saw while `run()` ran."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in modules.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return inputs


def time_modules(modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
                 repeats: int = 5) -> tuple[float, float]:
    """(layers' matmuls, head) in ms per step: the layers' linears replayed in model order on their
    recorded inputs, one whole pass at a time (so their weights come from wherever a real step finds
    them: the caches for a small model, memory for a large one), and the head alone; best of 3."""
    def best(pairs: list[tuple[nn.Module, torch.Tensor]]) -> float:
        if not pairs:
            return 0.0
        with torch.inference_mode():
            for module, x in pairs:
                module(x)
            fastest = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(repeats):
                    for module, x in pairs:
                        module(x)
                fastest = min(fastest, (time.perf_counter() - start) / repeats)
        return fastest * 1e3

    layers = [(m, inputs[name]) for name, m in modules.items() if not name.endswith("lm_head")]
    head = [(m, inputs[name]) for name, m in modules.items() if name.endswith("lm_head")]
    return best(layers), best(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--linear-method", default="auto", help="the engine's linear method (engine/linear.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    config = ModelConfig.from_flavor(args.flavor, **overrides)
    prompt = [(i * 7919) % (config.vocab_size - 1) + 1 for i in range(32)]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(config, seed=0), tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        engine = LLMEngine(tmp, dtype="fp32", device="cpu", enable_prefix_caching=False, linear_method=args.linear_method,
                           num_blocks=-(-(len(prompt) + args.tokens) // 16) + 1)
    ids = torch.tensor([prompt])

    def ours(n: int) -> float:
        start = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - start

    def theirs(n: int) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - start

    sides = {"lmfleet": ours, "hf": theirs}
    for run in sides.values():
        run(4)
    step = {name: float("inf") for name in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            step[name] = min(step[name], (run(args.tokens) - run(1)) / (args.tokens - 1) * 1e3)

    def hf_decode():  # generate's second forward is its first decode: the last input each linear sees
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)

    ours_modules = linear_modules(engine.runner.model)
    engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), request_id="x")
    engine.step()  # the prefill; the next step is the request's first decode
    ours_inputs = record_inputs(ours_modules, engine.step)
    while engine.has_unfinished_requests():
        engine.step()
    hf_modules = linear_modules(hf)
    measured = {"lmfleet": time_modules(ours_modules, ours_inputs),
                "hf": time_modules(hf_modules, record_inputs(hf_modules, hf_decode))}
    breakdown = {name: {"step_ms": step[name], "layer_matmuls_ms": layers, "head_ms": head,
                        "other_ms": step[name] - layers - head} for name, (layers, head) in measured.items()}
    machine = f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {machine}; model {args.flavor} {args.model_set} ({config.num_params() / 1e6:.1f}M params), fp32, "
          f"lmfleet linear method {args.linear_method}")
    print(f"{'':8} {'ms/step':>8} {'layers mm':>10} {'head':>7} {'other':>7}")
    for name, row in breakdown.items():
        print(f"{name:8} {row['step_ms']:8.2f} {row['layer_matmuls_ms']:10.2f} {row['head_ms']:7.2f} "
              f"{row['other_ms']:7.2f}")
    print(f"batch-1 decode: lmfleet {1e3 / step['lmfleet']:.1f} tok/s, HF {1e3 / step['hf']:.1f} tok/s, "
          f"ratio {step['hf'] / step['lmfleet']:.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "model_set": args.model_set, "breakdown": breakdown}, f, indent=2)


if __name__ == "__main__":
    main()
