"""Training pieces that need no processes: config validation, LR schedule, TokenLoader sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmfleet.data.corpus import Corpus, prepare_corpus
from lmfleet.data.loader import TokenLoader
from lmfleet.errors import ConfigError, DataError
from lmfleet.train.config import TrainConfig
from lmfleet.train.trainer import lr_at


@pytest.fixture(scope="module")
def corpus(text_dir, tmp_path_factory) -> Corpus:
    out = tmp_path_factory.mktemp("loader") / "c"
    prepare_corpus([str(text_dir)], out, vocab_size=400, shard_tokens=700)
    return Corpus(out)


def test_config_rejects_unknown_and_mistyped_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['optim.learning_rate'\]"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['optimizer'\]"):
        TrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match="train.steps='ten' must be of type int"):
        TrainConfig.from_dict({"train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match="train.strategy='zero' is not one of"):
        TrainConfig.from_dict({"train": {"strategy": "zero"}, "data": {"dir": "x"}}).validate()
    with pytest.raises(ConfigError, match=r"train.precision='fp16' is not one of \['fp32', 'bf16', 'fp64'\]"):
        TrainConfig.from_dict({"train": {"precision": "fp16"}, "data": {"dir": "x"}}).validate()
    config = TrainConfig.from_dict({"batch": {"micro_batch": 4, "global_batch": 24}, "data": {"dir": "x"}})
    config.validate(world_size=3)
    assert config.batch.grad_accum == 2
    with pytest.raises(ConfigError, match="not a multiple of micro_batch 4 x world size 4"):
        TrainConfig.from_dict({"batch": {"micro_batch": 4, "global_batch": 24}, "data": {"dir": "x"}}).validate(4)
    overridden = config.apply_overrides({"optim.lr": 1, "model.num_hidden_layers": 2, "model.flavor": "tiny"})
    assert overridden.optim.lr == 1.0 and isinstance(overridden.optim.lr, float)
    assert overridden.model.flavor == "tiny" and overridden.model.overrides == {"num_hidden_layers": 2}


def test_lr_schedule_hand_computed() -> None:
    config = TrainConfig.from_dict({"optim": {"lr": 1.0}, "schedule": {"warmup_steps": 4, "min_lr_ratio": 0.1},
                                    "train": {"steps": 14}})
    assert [lr_at(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, config) == 1.0
    assert math.isclose(lr_at(9, config), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(14, config), 0.1)


def test_loader_ranks_partition_the_single_process_stream(corpus: Corpus) -> None:
    single = TokenLoader(corpus, seq_len=16, micro_batch=6, grad_accum=1, seed=3)
    ranks = [TokenLoader(corpus, seq_len=16, micro_batch=3, grad_accum=1, rank=r, world_size=2, seed=3)
             for r in range(2)]
    accum = [TokenLoader(corpus, seq_len=16, micro_batch=1, grad_accum=3, rank=r, world_size=2, seed=3)
             for r in range(2)]
    for step in range(5):
        whole = single.batch(step, 0)[0]
        split = np.concatenate([ranks[r].batch(step, 0)[0] for r in range(2)])
        micro = np.concatenate([accum[r].batch(step, m)[0] for r in range(2) for m in range(3)])
        assert np.array_equal(whole, split) and np.array_equal(whole, micro)


def test_loader_windows_are_real_and_cover_an_epoch(corpus: Corpus) -> None:
    tokens = np.concatenate(corpus.shards("train"))
    loader = TokenLoader(corpus, seq_len=8, micro_batch=1, seed=0)
    seen = set()
    for step in range(loader.num_windows):
        x, y = loader.batch(step, 0)
        assert np.array_equal(x[0, 1:], y[0, :-1])
        shard, start = loader.windows[loader._order_for(0)[step]]
        assert np.array_equal(x[0].numpy(), np.asarray(corpus.shards("train")[shard][start:start + 8]))
        seen.add((int(shard), int(start)))
    assert len(seen) == loader.num_windows  # each window exactly once per epoch
    assert loader.num_windows * 8 <= len(tokens)
    other = TokenLoader(corpus, seq_len=8, micro_batch=1, seed=1)
    assert not all(np.array_equal(loader.batch(s, 0)[0], other.batch(s, 0)[0]) for s in range(10))


def test_loader_state_round_trip_and_mismatch(corpus: Corpus) -> None:
    loader = TokenLoader(corpus, seq_len=16, micro_batch=2, seed=0)
    loader.step = 7
    fresh = TokenLoader(corpus, seq_len=16, micro_batch=2, seed=0)
    fresh.load_state_dict(loader.state_dict())
    assert fresh.step == 7
    with pytest.raises(DataError, match="global_batch=2, this run has 4"):
        TokenLoader(corpus, seq_len=16, micro_batch=4, seed=0).load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenLoader(corpus, seq_len=100_000, micro_batch=1)
