"""Training pieces that need no processes: config validation, LR schedule, TokenLoader sharding,
checkpoint completeness and crash safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
    with pytest.raises(ConfigError, match="not a multiple of micro_batch 4 x data-parallel ranks 4"):
        TrainConfig.from_dict({"batch": {"micro_batch": 4, "global_batch": 24}, "data": {"dir": "x"}}).validate(4)
    # With tp=2 the 4 processes are 2 data-parallel ranks: 24 = 4 x 3 x 2.
    tp2 = TrainConfig.from_dict({"batch": {"micro_batch": 4, "global_batch": 24}, "parallel": {"tp": 2},
                                 "data": {"dir": "x"}})
    tp2.validate(4)
    assert tp2.batch.grad_accum == 3
    with pytest.raises(ConfigError, match=r"world size 3 is not a multiple of parallel.tp x parallel.pp = 2 x 1"):
        tp2.validate(3)
    with pytest.raises(ConfigError, match="tensor and pipeline parallelism are not combined yet"):
        TrainConfig.from_dict({"parallel": {"tp": 2, "pp": 2}, "data": {"dir": "x"}}).validate()
    with pytest.raises(ConfigError, match="model parallelism runs with strategy 'ddp'"):
        TrainConfig.from_dict({"parallel": {"pp": 2}, "train": {"strategy": "fsdp"}, "data": {"dir": "x"}}).validate()
    with pytest.raises(ConfigError, match=r"parallel.pp_schedule='zb' is not one of \['1f1b', 'gpipe'\]"):
        TrainConfig.from_dict({"parallel": {"pp_schedule": "zb"}, "data": {"dir": "x"}}).validate()
    with pytest.raises(ConfigError, match=r"train.metrics_port=70000 must be a TCP port \(1-65535\), or 0"):
        TrainConfig.from_dict({"train": {"metrics_port": 70000}, "data": {"dir": "x"}}).validate()
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


# ---- checkpoints (one process, no torch.distributed) ------------------------------------------

def _save(run, step: int, value: float) -> None:
    from lmfleet.train.checkpointing import save_checkpoint

    save_checkpoint(run, step, rank=0, sharded=None, local={"x": torch.tensor([value])},
                    meta={"world_size": 1}, keep_last=5)


def _resumable(run) -> tuple[int, float]:
    """What a new attempt resumes from, after its start-up clean-up: (step, saved value)."""
    from lmfleet.train.checkpointing import load_checkpoint, read_meta, remove_stale, select_checkpoint

    remove_stale(run)
    path = select_checkpoint(run, verify_hashes=True).path
    assert path is not None
    return read_meta(path)["step"], load_checkpoint(path, 0, None)["x"].item()


class _Crash(Exception):
    pass


class _CrashAt:
    """Wraps the durable file operations; the `at`-th call raises instead of running."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def wrap(self, real):
        def op(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise _Crash(real.__name__)
            return real(*args, **kwargs)
        return op


@pytest.mark.parametrize("replace", [False, True], ids=["new-step", "same-step"])
def test_a_crash_anywhere_in_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch, replace) -> None:
    """Kill the save at each of its durable operations in turn (fsync, rename, delete): the next
    attempt always finds a complete checkpoint, the old one or the new one, never less."""
    import os
    import shutil
    from pathlib import Path

    from lmfleet.train import checkpointing

    crash_at, outcomes = 1, []
    while True:
        run = tmp_path / f"run{crash_at}"
        _save(run, 1, 1.0)
        _save(run, 2, 2.0)
        crash = _CrashAt(crash_at)
        monkeypatch.setattr(checkpointing.os, "fsync", crash.wrap(os.fsync))
        monkeypatch.setattr(Path, "rename", crash.wrap(Path.rename))
        monkeypatch.setattr(checkpointing.shutil, "rmtree", crash.wrap(shutil.rmtree))
        if replace:  # the save a resumed run makes over an incomplete step_2 it skipped
            (run / "checkpoints" / "step_2" / "manifest.json").unlink()
        try:
            _save(run, 2 if replace else 3, 9.0)
            crashed = False
        except _Crash:
            crashed = True
        monkeypatch.undo()
        outcomes.append(_resumable(run))
        if not crashed:
            break
        crash_at += 1
    new = (2, 9.0) if replace else (3, 9.0)
    old = (1, 1.0) if replace else (2, 2.0)
    assert crash_at > 5  # the save went through many fsyncs and renames, each a crash point
    assert outcomes[-1] == new
    assert set(outcomes) == {old, new}


def test_incomplete_checkpoints_are_skipped_with_the_reason(tmp_path) -> None:
    from lmfleet.errors import LmfleetError
    from lmfleet.train.checkpointing import load_checkpoint, select_checkpoint

    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _save(run, step, float(step))
    root = run / "checkpoints"
    (root / "step_4" / "manifest.json").unlink()
    (root / "step_3" / "rank_0.pt").unlink()
    data = (root / "step_2" / "rank_0.pt").read_bytes()
    (root / "step_2" / "rank_0.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    by_size = select_checkpoint(run)
    assert by_size.path == root / "step_2"
    assert [(p.name, why) for p, why in by_size.skipped] == [
        ("step_4", "no manifest.json (its save did not finish, or it predates checkpoint manifests)"), ("step_3", "rank_0.pt is missing")]
    hashed = select_checkpoint(run, verify_hashes=True)
    assert hashed.path == root / "step_1"
    assert hashed.skipped[-1] == (root / "step_2", "rank_0.pt does not match its SHA-256 in the manifest")
    assert "resuming from" in hashed.describe() and "skipped step_3: rank_0.pt is missing" in hashed.describe()
    with pytest.raises(LmfleetError, match="step_3 is incomplete: rank_0.pt is missing"):
        load_checkpoint(root / "step_3", 0, None)


def test_saving_never_deletes_a_checkpoint_without_a_manifest(tmp_path) -> None:
    """A `step_<N>` with no manifest was not written by this format's save (an older lmfleet's
    checkpoint): pruning after newer saves leaves it alone; damaged ones of this format go."""
    run = tmp_path / "run"
    _save(run, 1, 1.0)
    _save(run, 2, 2.0)
    root = run / "checkpoints"
    (root / "step_1" / "manifest.json").unlink()  # what an older lmfleet left
    (root / "step_2" / "rank_0.pt").write_bytes(b"cut")  # this format's, damaged
    legacy = {p: p.read_bytes() for p in (root / "step_1").rglob("*") if p.is_file()}
    _save(run, 3, 3.0)
    _save(run, 4, 4.0)
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_3", "step_4"]
    assert {p: p.read_bytes() for p in (root / "step_1").rglob("*") if p.is_file()} == legacy


def test_training_exporter_on_a_busy_port_warns_and_lets_training_go_on(monkeypatch, capsys) -> None:
    import socket

    import httpx

    from lmfleet.train import exporter as exporter_module
    from lmfleet.train.exporter import TrainingExporter

    monkeypatch.setattr(exporter_module, "BIND_PAUSE_S", 0.01)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert TrainingExporter("run", 10, 1, 0).start(port, "127.0.0.1") is False
    assert "warning: training metrics not served: cannot listen on 127.0.0.1:" in capsys.readouterr().err
    # On a free port it serves what it was told, and stops serving when closed.
    served = TrainingExporter("run", 10, 1, 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert served.start(port, "127.0.0.1")
    served.observe({"kind": "train", "step": 3, "loss": 1.25, "tokens_per_s": 100.0})
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'lmfleet_train:loss{run="run"} 1.25' in text and 'lmfleet_train:step{run="run"} 3.0' in text
    served.close()
    try:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
        raise AssertionError("still serving after close")
    except httpx.TransportError:
        pass


# What Prometheus 2.x sends: OpenMetrics first. prometheus_client then escapes ':' in names to '_'.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def test_training_exporter_keeps_its_metric_names_whatever_format_the_scraper_asks_for() -> None:
    """A real Prometheus asks for OpenMetrics; the names it stores must be the lmfleet_train:*
    names the rules and dashboards read, not lmfleet_train_* (then no training alert could fire)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from lmfleet.train.exporter import TrainingExporter

    from .helpers import free_port

    served, port = TrainingExporter("run", 10, 1, 0), free_port()
    assert served.start(port, "127.0.0.1")
    try:
        served.observe({"kind": "train", "step": 3, "loss": 1.25, "tokens_per_s": 100.0})
        for accept in (PROMETHEUS_ACCEPT, "text/plain;version=0.0.4", "*/*"):
            answer = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
            samples = {s.name: s.value for f in text_string_to_metric_families(answer.text) for s in f.samples}
            assert samples["lmfleet_train:step"] == 3 and samples["lmfleet_train:loss"] == 1.25, accept
            assert not any(name.startswith("lmfleet_train_") for name in samples), sorted(samples)
        assert httpx.get(f"http://127.0.0.1:{port}/other").status_code == 404
    finally:
        served.close()
    # An IPv6 host binds an IPv6 socket (the metrics host may be "::" or "::1").
    served6, port6 = TrainingExporter("run", 10, 1, 0), free_port()
    assert served6.start(port6, "::1")
    try:
        assert 'lmfleet_train:total_steps{run="run"} 10.0' in httpx.get(f"http://[::1]:{port6}/metrics").text
    finally:
        served6.close()
