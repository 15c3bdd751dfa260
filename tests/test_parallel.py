"""Tensor parallelism against one process: the same model split across 2 gloo processes gives the
logits of the unsplit model (float64, so only the order of the sums differs)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmfleet.errors import ConfigError
from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import build_model
from lmfleet.parallel.tensor_parallel import check_tp, shard_for_inference, tp_layout

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
CASES = {
    "kv split (2 KV heads)": dict(vocab_size=200, num_key_value_heads=2),
    "kv replicated (1 KV head)": dict(vocab_size=200, num_key_value_heads=1),
    "biases, head replicated (odd vocabulary)": dict(vocab_size=201, num_key_value_heads=4, qkv_bias=True,
                                                      o_bias=True, mlp_bias=True),
}


def _rank(rank: int, tp: int, store: str, shape: dict, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
    try:
        config = ModelConfig(**BASE, **shape)
        ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        results = {}
        for fused in (False, True):
            model = build_model(config, seed=3, dtype=torch.float64)
            if fused:  # shard, then fuse and pick linear methods as the engine does
                from lmfleet.engine.linear import apply_linear_method

                shard_for_inference(model, tp, rank)
                model.fuse_projections()
                apply_linear_method(model, "transposed")
            else:
                shard_for_inference(model, tp, rank)
            with torch.no_grad():
                results["fused" if fused else "plain"] = model(ids)
            results["params"] = sum(p.numel() for p in model.parameters())
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # neither rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()
    # Leave without C++ static destructors: with torch 2.13 a gloo process sometimes aborts in them
    # ("terminate called without an active exception") after everything above has finished.
    os._exit(0)


@pytest.mark.parametrize("shape", list(CASES.values()), ids=list(CASES))
def test_tensor_parallel_logits_equal_one_process(shape, tmp_path) -> None:
    config = ModelConfig(**BASE, **shape)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    whole = build_model(config, seed=3, dtype=torch.float64)
    with torch.no_grad():
        reference = whole(ids)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), shape, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for variant in ("plain", "fused"):
        assert got[variant].shape == reference.shape
        assert (got[variant] - reference).abs().max().item() < 1e-10, variant
    # Each rank holds its share of every split weight (the embedding, norms and an odd-sized head stay whole).
    total = sum(p.numel() for p in whole.parameters())
    assert got["params"] < total


def test_layouts_and_errors_name_the_problem() -> None:
    gqa = ModelConfig(**BASE, vocab_size=200, num_key_value_heads=1)
    assert [(lay.first_head, lay.heads, lay.first_kv_head, lay.kv_heads)
            for lay in (tp_layout(gqa, 4, r) for r in range(4))] == [(0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 0, 1),
                                                                     (3, 1, 0, 1)]
    assert tp_layout(gqa, 2, 1).kv_replicated
    split = ModelConfig(**BASE, vocab_size=200, num_key_value_heads=2)
    assert [(lay.first_kv_head, lay.kv_heads) for lay in (tp_layout(split, 2, r) for r in range(2))] == [(0, 1), (1, 1)]
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
        check_tp(split, 3)
    with pytest.raises(ConfigError, match="does not divide intermediate_size=90"):
        check_tp(ModelConfig(**(BASE | {"intermediate_size": 90}), vocab_size=200), 4)
    odd_kv = ModelConfig(**(BASE | {"num_attention_heads": 12}), head_dim=8, vocab_size=200, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 and num_key_value_heads=3: one must divide"):
        check_tp(odd_kv, 2)
