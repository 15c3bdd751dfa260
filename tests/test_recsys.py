"""The recommender: data preparation against hand-built logs, SASRec's masking against direct
computation, training against baselines and against a single-process / uninterrupted run,
evaluation metrics against hand-computed ranks."""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmfleet.errors import ConfigError, DataError
from lmfleet.recsys.data import RecData, SequenceLoader, prepare_interactions, read_interactions
from lmfleet.recsys.evaluate import evaluate_scorer, itemknn_scorer, metrics_from_ranks, popularity_scorer, ranks_of
from lmfleet.recsys.model import SASRecConfig, build_sasrec, load_sasrec, top_k_rows
from lmfleet.recsys.train import recsys_loss
from lmfleet.train.metrics import read_metrics
from lmfleet.train.plot import plot_run

from .helpers import assert_one_line_error, free_port, require_tool, run_cli, serve_process, stop_process, wait_healthy

MANIFEST_NAME = "manifest.json"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sasrec-debug.toml"
ROWS = [("7", "b", 30), ("7", "a", 10), ("3", "c", 5), ("7", "c", 20), ("3", "a", 5), ("3", "b", 1), ("9", "a", 2)]


def write_log(path: Path, fmt: str) -> Path:
    if fmt == "u.data":
        path.write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in ROWS))
    elif fmt == "ratings.dat":
        path.write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in ROWS))
    elif fmt == "inter":
        path.write_text(
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in ROWS)
        )
    elif fmt == "csv":
        path.write_text("timestamp,user_id,item_id\n" + "".join(f"{t},{u},{i}\n" for u, i, t in ROWS))
    else:  # csv without a header: user,item,timestamp
        path.write_text("".join(f"{u},{i},{t}\n" for u, i, t in ROWS))
    return path


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("u.data", "u.data"),
        ("ratings.dat", "ratings.dat"),
        ("log.inter", "inter"),
        ("log.csv", "csv"),
        ("plain.csv", "plain"),
    ],
)
def test_prepare_orders_by_time_and_splits_leave_one_out(tmp_path, name, fmt) -> None:
    manifest = prepare_interactions(write_log(tmp_path / name, fmt), tmp_path / "data")
    data = RecData(tmp_path / "data")
    assert data.item_ids == ["a", "b", "c"] and manifest["num_users"] == 3 and manifest["interactions"] == 7
    users = json.loads((tmp_path / "data" / "user_ids.json").read_text())
    assert users == ["3", "7", "9"]  # numeric ids in numeric order
    a, b, c = 1, 2, 3
    # User "3": b at t=1, then c and a both at t=5 in file order (c first).
    assert data.sequence(0).tolist() == [b, c, a]
    assert data.sequence(1).tolist() == [a, c, b]  # user "7" by time 10, 20, 30
    assert data.case(1, "valid") == ([a], c) and data.case(1, "test")[1] == b
    assert data.case(1, "test")[0].tolist() == [a, c]
    assert data.train_sequence(2).tolist() == [a]  # one interaction: training only
    assert data.eval_users().tolist() == [0, 1]
    assert data.item_counts().tolist() == [0, 2, 1, 0]  # training parts only: [b], [a], [a]


def test_prepare_refuses_bad_logs_in_one_line(tmp_path) -> None:
    bad = tmp_path / "u.data"
    bad.write_text("1\t2\t3\t100\n1\t2\t3\tlater\n")
    assert_one_line_error(
        run_cli("recsys", "prepare", "--interactions", str(bad), "--out", str(tmp_path / "o")),
        "u.data:2",
        "'later' is not a number",
    )
    short = tmp_path / "short.csv"
    short.write_text("1,2,3\n4,5\n")
    assert_one_line_error(
        run_cli("recsys", "prepare", "--interactions", str(short), "--out", str(tmp_path / "o")),
        "short.csv:2",
        "2 field(s)",
    )
    empty = tmp_path / "empty.inter"
    empty.write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    assert_one_line_error(
        run_cli("recsys", "prepare", "--interactions", str(empty), "--out", str(tmp_path / "o")),
        "holds no interactions",
    )
    assert_one_line_error(
        run_cli("recsys", "prepare", "--synthetic", "10", "--out", str(tmp_path / "o")), "USERS,ITEMS"
    )
    assert_one_line_error(run_cli("recsys", "prepare", "--out", str(tmp_path / "o")), "--interactions", "--synthetic")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(
        run_cli("recsys", "prepare", "--synthetic", "10,5", "--out", str(other)), "holds no recsys dataset"
    )
    assert (other / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written directory left


def test_synthetic_log_has_the_planted_rule(tmp_path) -> None:
    rows = read_interactions(write_log(tmp_path / "u.data", "u.data"))
    assert rows.users[:2] == ["7", "7"]
    prepare_interactions(None, tmp_path / "syn", synthetic=(200, 100), seed=3)
    data = RecData(tmp_path / "syn")
    pairs = np.concatenate([np.stack([data.sequence(u)[:-1], data.sequence(u)[1:]], 1) for u in range(200)])
    original = [int(i[1:]) for i in data.item_ids]  # item index -> generated id
    follows = np.mean([(original[b - 1] - original[a - 1]) % 100 == 1 for a, b in pairs])
    assert 0.75 < follows < 0.9  # follow=0.8, plus chance


def small_model(num_items=30, max_len=8, dtype=torch.float64, dropout=0.0):
    config = SASRecConfig(
        num_items=num_items, hidden_size=16, num_layers=2, num_heads=2, max_len=max_len, dropout=dropout
    )
    return build_sasrec(config, seed=1, dtype=dtype).eval()


def test_sasrec_is_causal_and_ignores_padding() -> None:
    model = small_model()
    history = torch.tensor([[0, 0, 0, 5, 9, 2, 7, 4]])
    scores = model(history)
    changed = history.clone()
    changed[0, -1] = 11
    assert torch.allclose(model(changed)[0, :-1], scores[0, :-1], atol=1e-12)  # the past ignores the future
    assert not torch.allclose(model(changed)[0, -1], scores[0, -1])
    # Less left padding (a shorter batch) gives the same scores after the history.
    assert torch.allclose(model(history[:, 3:])[0, -1], scores[0, -1], atol=1e-12)
    assert torch.allclose(model.score_last([[5, 9, 2, 7, 4]])[0], scores[0, -1], atol=1e-12)
    # The last-position path (its last layer run for that position alone, in row blocks) is the
    # full forward's last row, for more rows than one block and for empty histories.
    batch = torch.randint(1, 31, (20, 8), generator=torch.Generator().manual_seed(0))
    batch[0], batch[1, :6] = 0, 0
    assert torch.allclose(model(batch, last_only=True)[:, 1:], model(batch)[:, -1, 1:], atol=1e-12)
    # Candidates score as the full table does.
    candidates = torch.randint(1, 31, (1, 8, 3))
    x = torch.cat([history[..., None], candidates], -1)
    assert torch.allclose(model(x), scores.gather(2, candidates), atol=1e-12)
    assert scores[0, -1, 0] == float("-inf")
    items, values = model.recommend([5, 9, 2, 7, 4], k=5)
    assert len(items) == 5 and not {5, 9, 2, 7, 4} & set(items) and values == sorted(values, reverse=True)
    # A history covering all but two items gets those two, never the padding index 0 (it came back
    # as a third item, scored -1.8e308, which the server named as the catalog's last item).
    assert sorted(model.recommend(list(range(1, 29)), k=5)[0]) == [29, 30]
    assert model.recommend(list(range(1, 31)), k=5) == ([], [])


def test_top_k_is_the_exact_ranking_whatever_the_batch() -> None:
    """`top_k_rows` against exact rational arithmetic: near-ties one float32 ulp apart, exact ties
    (to the lower id), exclusions and a NaN item; the answer for a row is the same bits alone or
    in batches of any size (the one matmul's kernel changes with the batch)."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(3)
    table = torch.randn(400, 16, generator=gen)
    table[0] = 0
    table[7] = table[3]  # an exact tie with item 3
    table[8] = table[3] + torch.finfo(torch.float32).eps * table[3].abs()  # a near-tie
    table[9] = float("nan")
    hidden = torch.randn(40, 16, generator=gen)
    hidden[5] = table[3] * 4  # items 3, 7, 8 lead, within rounding of each other
    excludes = [[1, 2, 2, 399] if r % 3 == 0 else [] for r in range(40)]
    ks = [1 + r % 12 for r in range(40)]

    def exact(row: int) -> tuple[list[int], list[float]]:
        h = [Fraction(float(v)) for v in hidden[row]]
        scores = {
            i: sum(Fraction(float(t)) * x for t, x in zip(table[i], h))
            for i in range(1, 400)
            if i != 9 and i not in excludes[row]
        }
        best = sorted(scores, key=lambda i: (-scores[i], i))[: ks[row]]
        return best, [float(scores[i]) for i in best]

    alone = [top_k_rows(hidden[r : r + 1], table, ks[r : r + 1], excludes[r : r + 1])[0] for r in range(40)]
    for r in (0, 5, 6, 17, 39):
        items, scores = exact(r)
        assert alone[r][0] == items, r
        assert alone[r][1] == pytest.approx(scores, rel=1e-13, abs=1e-13), r
    assert alone[5][0][:3] == [3, 7, 8] or alone[5][0][:3] == [8, 3, 7]
    for size in (2, 3, 5, 8, 13, 16, 17, 40):
        batched = []
        for start in range(0, 40, size):
            batched += top_k_rows(hidden[start : start + size], table, ks[start : start + size],
                                  excludes[start : start + size])
        assert batched == alone, size


@pytest.mark.parametrize("max_len", [2, 6, 50])
def test_recommendations_are_the_same_bits_alone_or_batched_on_one_or_two_threads(max_len) -> None:
    """A float32 model's hidden states and answers for 40 histories, one at a time and all together,
    on one and on two threads: identical (short max_len put a batch of one into other GEMM kernels)."""
    config = SASRecConfig(num_items=300, max_len=max_len, hidden_size=64, num_layers=2, num_heads=2)
    model = build_sasrec(config, seed=0).eval()
    gen = torch.Generator().manual_seed(max_len)
    histories = [torch.randint(1, 301, (int(n),), generator=gen).tolist() for n in torch.randint(1, 10, (40,), generator=gen)]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            alone = torch.cat([model.hidden_last([h]) for h in histories])
            results.append((alone, [model.recommend(h, 10) for h in histories]))
            results.append((model.hidden_last(histories), model.recommend_rows(histories, [10] * 40, histories)))
    finally:
        torch.set_num_threads(threads)
    for hidden, answers in results[1:]:
        assert torch.equal(hidden, results[0][0])
        assert answers == results[0][1]


def test_loss_matches_a_hand_computation() -> None:
    scores = torch.tensor([[[2.0, -1.0], [0.5, 0.3], [9.0, 9.0]]], dtype=torch.float64)  # [1, 3, 1 + 1]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    bce = lambda p, n: -math.log(1 / (1 + math.exp(-p))) - math.log(1 - 1 / (1 + math.exp(-n)))  # noqa: E731
    assert abs(recsys_loss(scores, mask).item() - (bce(2.0, -1.0) + bce(0.5, 0.3)) / 2) < 1e-12
    logits = torch.tensor([[[float("-inf"), 1.0, 2.0], [float("-inf"), 0.0, 0.0]]], dtype=torch.float64)
    targets = torch.tensor([[2, 0]])
    assert abs(recsys_loss(logits, targets).item() - (math.log(math.exp(1) + math.exp(2)) - 2)) < 1e-12


def test_ranks_and_metrics_match_hand_computation() -> None:
    scores = torch.tensor(
        [[float("-inf"), 0.1, 0.9, 0.5, 0.5], [float("-inf"), 0.3, 0.3, 0.3, 0.0]], dtype=torch.float64
    )
    assert ranks_of(scores, torch.tensor([3, 2])).tolist() == [1, 1]  # 0.9 ahead; equal score, lower id ahead
    assert ranks_of(scores, torch.tensor([4, 1]), torch.tensor([[1, 2], [4, 4]])).tolist() == [1, 0]
    m = metrics_from_ranks(torch.tensor([0, 1, 12]), 10)
    assert abs(m["hr@10"] - 2 / 3) < 1e-12 and abs(m["ndcg@10"] - (1 + 1 / math.log2(3)) / 3) < 1e-12
    # A diverged model scores nothing: a NaN target ranks last, a NaN item counts as ahead.
    nan = float("nan")
    diverged = torch.tensor([[float("-inf"), 5.0, nan, 1.0], [float("-inf"), nan, 0.1, 0.2]], dtype=torch.float64)
    assert ranks_of(diverged, torch.tensor([2, 3])).tolist() == [2, 1]
    assert ranks_of(diverged, torch.tensor([2, 3]), torch.tensor([[1, 3], [2, 2]])).tolist() == [2, 0]


def test_crafted_dataset_directories_are_refused_in_one_line(tmp_path) -> None:
    prepare_interactions(None, tmp_path / "d", synthetic=(30, 20), seed=1)
    good = {name: (tmp_path / "d" / name).read_bytes() for name in ("offsets.npy", "items.npy", MANIFEST_NAME)}

    def crafted(name: str, data: bytes) -> None:
        for n, b in good.items():
            (tmp_path / "d" / n).write_bytes(b)
        (tmp_path / "d" / name).write_bytes(data)
        with pytest.raises(DataError) as info:
            RecData(tmp_path / "d")
        assert "\n" not in str(info.value) and str(tmp_path / "d") in str(info.value)

    offsets = np.load(tmp_path / "d" / "offsets.npy")
    for bad in (offsets[::-1].astype(np.uint64), offsets.reshape(1, -1), np.zeros(0, np.int64), offsets.astype(float)):
        buf = io.BytesIO()
        np.save(buf, bad)
        crafted("offsets.npy", buf.getvalue())
    header = good["items.npy"].replace(b"'shape': (", b"'shape': (1099511627776")  # claims 2^40 more items
    crafted("items.npy", header)
    manifest = json.loads(good[MANIFEST_NAME])
    for broken in (
        {**manifest, "num_items": "many"},
        {k: v for k, v in manifest.items() if k != "num_items"},
        {**manifest, "num_items": 10**12},
    ):
        crafted(MANIFEST_NAME, json.dumps(broken).encode())


def test_itemknn_matches_a_dense_cosine(tmp_path) -> None:
    prepare_interactions(None, tmp_path / "d", synthetic=(60, 20), seed=5)
    data = RecData(tmp_path / "d")
    x = torch.zeros(data.num_users, data.num_items + 1, dtype=torch.float64)
    for u in range(data.num_users):
        x[u, torch.as_tensor(data.train_sequence(u), dtype=torch.long)] = 1
    norms = x.sum(0).sqrt().clamp_min(1e-12)
    sim = (x.t() @ x) / norms[:, None] / norms[None]
    sim.fill_diagonal_(0)
    histories = [data.case(u, "test")[0] for u in range(5)]
    multi = torch.zeros(5, data.num_items + 1, dtype=torch.float64)
    for row, h in enumerate(histories):
        multi[row, torch.as_tensor(np.unique(h), dtype=torch.long)] = 1
    expected = multi @ sim  # every neighbour kept (20 items < 100)
    got = itemknn_scorer(data)(histories)
    assert torch.allclose(got[:, 1:], expected[:, 1:], atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recsys")
    prepare_interactions(None, root / "data", synthetic=(400, 300), seed=0)
    result = run_cli(
        "recsys", "train", str(CONFIG), "--data", str(root / "data"), "--out", str(root / "run"), "--steps", "150"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "data", root / "run"


def test_trained_model_beats_popularity_and_itemknn(trained) -> None:
    data_dir, run = trained
    result = run_cli("recsys", "eval", str(run / "final"), "--data", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"model", "popularity", "itemknn"}
    for name in metrics:
        assert set(metrics[name]) == {"full", "sampled"} and metrics[name]["full"]["users"] == 400
    model, pop = metrics["model"], metrics["popularity"]
    assert model["full"]["ndcg@10"] > pop["full"]["ndcg@10"] + 0.08
    assert model["sampled"]["ndcg@10"] > pop["sampled"]["ndcg@10"] + 0.08
    assert model["full"]["ndcg@10"] > metrics["itemknn"]["full"]["ndcg@10"]
    # The run's metrics and its final validation point.
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30, 60, 90, 120, 150]
    assert evals[-1]["val_ndcg@10"] > evals[0]["val_ndcg@10"] + 0.1
    assert plot_run(run, run / "plot.png").read_bytes()[:4] == b"\x89PNG"  # loss and validation NDCG/HR
    # The exported directory: what evaluate_scorer computes offline equals what eval printed.
    loaded, item_ids, extra = load_sasrec(run / "final")
    data = RecData(data_dir)
    assert item_ids == data.item_ids and extra["item_counts"].tolist() == data.item_counts().tolist()
    again = evaluate_scorer(loaded.score_last, data, "test")
    assert again["full"]["ndcg@10"] == pytest.approx(model["full"]["ndcg@10"], abs=1e-12)


def test_popularity_scores_the_training_counts(trained) -> None:
    data = RecData(trained[0])
    scores = popularity_scorer(data)([np.array([1]), np.array([2])])
    order = torch.argsort(scores[0], descending=True)[:5].tolist()
    counts = data.item_counts()
    assert [counts[i] for i in order] == sorted(counts[1:], reverse=True)[:5]


def test_resume_is_exact(trained, tmp_path) -> None:
    data_dir = trained[0]
    args = (
        "recsys",
        "train",
        str(CONFIG),
        "--data",
        str(data_dir),
        "--set",
        "eval.every=0",
        "--set",
        "checkpoint.every=10",
    )
    def train(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        # Each run in a fresh process: the same torch threads for all three (an earlier test may
        # have changed this process's), as a user's runs would be.
        return subprocess.run([sys.executable, "-m", "lmfleet.cli", *args, *extra], env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=300)

    assert train("--out", str(tmp_path / "straight"), "--steps", "20").returncode == 0
    # The same 20-step run killed (SIGKILL, no restarts) after its step-10 checkpoint, then resumed.
    killed = train("--out", str(tmp_path / "part"), "--steps", "20", env={"LMFLEET_FAULT_STEP": "10"})
    assert killed.returncode != 0 and not (tmp_path / "part" / "final").exists()
    resumed = train("--out", str(tmp_path / "part"), "--steps", "20", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dropout RNG included

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]

    assert losses(tmp_path / "part") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 20
    other, _ = trained
    refused = run_cli(
        *args, "--out", str(tmp_path / "part"), "--steps", "30", "--resume", "--set", "model.hidden_size=64"
    )
    assert_one_line_error(refused, "hidden_size")


@pytest.mark.integration
def test_two_ddp_processes_equal_one_with_double_batch(trained, tmp_path) -> None:
    """In float64 and without dropout (each rank draws its own dropout masks, as in any DDP run)."""
    data_dir = trained[0]

    def train(out: Path, nproc: int, micro: int, *extra: str) -> dict[str, torch.Tensor]:
        cmd = [
            sys.executable,
            "-m",
            "lmfleet.cli",
            "recsys",
            "train",
            str(CONFIG),
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--steps",
            "8",
            "--nproc",
            str(nproc),
            "--set",
            "train.precision=fp64",
            "--set",
            "model.dropout=0.0",
            "--set",
            f"batch.micro_batch={micro}",
            "--set",
            "eval.every=4",
            "--set",
            "recsys.eval_users=100",
            *extra,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert done.returncode == 0, done.stderr[-3000:]
        return load_file(str(out / "final" / "model.safetensors"))

    single = train(tmp_path / "one", 1, 16)
    assert single["item_embedding.weight"].dtype == torch.float64
    for strategy in ("ddp", "fsdp"):
        pair = train(tmp_path / strategy, 2, 8, "--strategy", strategy)
        assert max((single[k] - pair[k]).abs().max().item() for k in single) <= 1e-10, strategy
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] in ("train", "eval")]
    two = [r for r in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if r["kind"] in ("train", "eval")]
    assert [r["kind"] for r in one] == [r["kind"] for r in two] and len(one) > 8
    for a, b in zip(one, two):
        assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), abs=1e-10)


def test_loader_is_the_same_stream_whatever_the_ranks(trained) -> None:
    data = RecData(trained[0])
    whole = SequenceLoader(data, 20, micro_batch=8, seed=4, negatives=2).batch(3, 0)
    halves = [
        SequenceLoader(data, 20, micro_batch=4, rank=r, world_size=2, seed=4, negatives=2).batch(3, 0) for r in range(2)
    ]
    assert torch.equal(whole[0], torch.cat([h[0] for h in halves]))
    x, mask = whole
    assert x.shape == (8, 20, 4) and mask.shape == (8, 20)
    history, positive, negatives = x[..., 0], x[..., 1], x[..., 2:]
    known = positive[:, :-1] != 0  # targets are the next items (the first item has no previous target)
    assert torch.equal(history[:, 1:][known], positive[:, :-1][known]) and known.sum() > 50
    assert torch.equal(mask, (positive != 0).float()) and torch.equal(positive != 0, history != 0)
    for row in range(8):  # negatives are never items the user trained on
        seen = set(history[row].tolist()) | set(positive[row].tolist())
        assert not (set(negatives[row][mask[row] > 0].flatten().tolist()) & seen)


def test_bad_recsys_settings_are_one_line_errors(trained, tmp_path) -> None:
    data_dir = trained[0]
    base = ("recsys", "train", str(CONFIG), "--data", str(data_dir), "--out", str(tmp_path / "r"))
    assert_one_line_error(run_cli(*base, "--set", "recsys.loss=hinge"), "recsys.loss='hinge'")
    assert_one_line_error(run_cli(*base, "--set", "model.num_items=5"), "model.num_items comes from the data")
    assert_one_line_error(
        run_cli(*base, "--set", "model.hidden_size=30", "--set", "model.num_heads=4"),
        "not a multiple of model.num_heads",
    )
    assert_one_line_error(run_cli(*base, "--set", "model.colour=1"), "model.colour")
    assert_one_line_error(run_cli(*base, "--set", "parallel.tp=2", "--nproc", "2"), "data parallel")
    assert_one_line_error(
        run_cli("recsys", "train", str(CONFIG), "--data", str(tmp_path), "--out", str(tmp_path / "r")),
        "not a recsys dataset",
    )
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="k=0"):
        evaluate_scorer(lambda h: torch.zeros(len(h), 301), RecData(data_dir), k=0)
    with pytest.raises(DataError, match="corrupt"):
        broken = tmp_path / "broken"
        import shutil

        shutil.copytree(data_dir, broken)
        np.save(broken / "offsets.npy", np.array([0, 5, 3], dtype=np.int64))
        RecData(broken)


# ---- serving -------------------------------------------------------------------------------------
KEY = "recsys-test-key-1"


def _recommend(url: str, body: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/recommendations", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _post_events(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/events", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


@pytest.fixture(scope="module")
def recsys_server(trained):
    data_dir, run = trained
    proc, url = serve_process(
        run / "final",
        "--data",
        str(data_dir),
        "--api-key",
        KEY,
        "--max-batch",
        "16",
        "--max-wait-ms",
        "50",
        "--threads",
        "1",
        "--log-level",
        "warning",
        command=("recsys", "serve"),
    )
    yield url
    stop_process(proc)


def _offline(trained):
    data_dir, run = trained
    model, item_ids, _ = load_sasrec(run / "final")
    data = RecData(data_dir)
    return model, item_ids, data


def test_served_top_k_is_the_offline_recommendation_batched_or_not(trained, recsys_server) -> None:
    model, item_ids, data = _offline(trained)
    users = list(range(24))
    expected = {}
    for u in users:
        items, scores = model.recommend(data.sequence(u).tolist(), k=10)
        expected[u] = ([item_ids[i - 1] for i in items], scores)
    one_by_one = {}
    for u in users:
        r = _recommend(recsys_server, {"user_id": data.user_ids[u], "k": 10})
        assert r.status_code == 200, r.text
        one_by_one[u] = r.json()
        assert r.json()["source"] == "model" and r.json()["history_length"] == len(data.sequence(u))
    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        together = dict(
            zip(users, pool.map(lambda u: _recommend(recsys_server, {"user_id": data.user_ids[u]}).json(), users))
        )
    for u in users:
        got = [d["item_id"] for d in one_by_one[u]["data"]]
        assert got == expected[u][0], u
        assert [d["score"] for d in one_by_one[u]["data"]] == expected[u][1]  # the same bits as offline
        assert together[u]["data"] == one_by_one[u]["data"], u  # batched == unbatched, scores included
    seen = set(data.sequence(0).tolist())
    assert not {item_ids.index(d["item_id"]) + 1 for d in one_by_one[0]["data"]} & seen  # exclude_seen
    # The concurrent requests did share forwards: more requests than batches.
    samples = _samples(recsys_server)
    count = samples['lmfleet_recsys:batch_size_count{model_name="run"}']
    total = samples['lmfleet_recsys:batch_size_sum{model_name="run"}']
    assert total >= 2 * len(users) and count < total


def _samples(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lmfleet_recsys:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_an_event_changes_the_next_recommendation_as_offline(trained, recsys_server) -> None:
    model, item_ids, data = _offline(trained)
    user = data.user_ids[30]
    before = _recommend(recsys_server, {"user_id": user, "k": 5}).json()
    item = before["data"][0]["item_id"]
    posted = _post_events(recsys_server, {"user_id": user, "item_id": item, "event_id": "e-1"})
    assert posted.status_code == 200 and posted.json()["accepted"] == 1, posted.text
    # A retry of the same event (its answer lost) is acknowledged and not appended again.
    again = _post_events(recsys_server, {"user_id": user, "item_id": item, "event_id": "e-1"}).json()
    assert again["repeat"] is True and again["accepted"] == 0 and again["events_kept"] == 1, again
    # The same id for other items is refused, and nothing is written.
    reused = _post_events(recsys_server, {"user_id": user, "items": item_ids[:2], "event_id": "e-1"})
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "event_id_conflict", reused.text
    after = _recommend(recsys_server, {"user_id": user, "k": 5}).json()
    history = data.sequence(30).tolist() + [item_ids.index(item) + 1]
    items, scores = model.recommend(history, k=5)
    assert [d["item_id"] for d in after["data"]] == [item_ids[i - 1] for i in items]
    assert item not in [d["item_id"] for d in after["data"]] and after["history_length"] == len(history)
    # The same history sent in the request gives the same answer.
    sent = _recommend(recsys_server, {"history": [item_ids[i - 1] for i in history], "k": 5}).json()
    assert sent["data"] == after["data"]
    # A new user: popularity until it has events, then the model on those events.
    cold = _recommend(recsys_server, {"user_id": "someone-new", "k": 3}).json()
    counts = RecData(trained[0]).item_counts()
    top = sorted(range(1, len(counts)), key=lambda i: (-counts[i], i))[:3]
    assert cold["source"] == "popularity" and [d["item_id"] for d in cold["data"]] == [item_ids[i - 1] for i in top]
    assert _post_events(recsys_server, {"user_id": "someone-new", "items": item_ids[4:6]}).status_code == 200
    warm = _recommend(recsys_server, {"user_id": "someone-new", "k": 3}).json()
    expected_items, _ = model.recommend([5, 6], k=3)
    assert warm["source"] == "model" and [d["item_id"] for d in warm["data"]] == [
        item_ids[i - 1] for i in expected_items
    ]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 100_000}, "k"),
        ({"user_id": "u", "k": "ten"}, "k"),
        ({"history": ["no-such-item"]}, "history"),
        ({"history": [1.5]}, "history"),
        ({"history": [True]}, "history"),
        ({"history": [{"id": 1}]}, "history"),
        ({}, "user_id"),
        ({"user_id": "u", "history": ["i5"]}, "user_id"),
        ({"user_id": "x" * 500}, "user_id"),
        ({"user_id": "u", "surprise": 1}, "surprise"),
        ({"user_id": "u", "model": "other"}, "model"),
    ],
)
def test_bad_recommendation_requests_get_a_clear_4xx(recsys_server, body, param) -> None:
    r = _recommend(recsys_server, body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert (
        error["param"] == param and error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    )


def test_bad_events_and_keys_are_refused_and_nothing_is_written(trained, recsys_server) -> None:
    user = "events-check"
    for body in (
        {"user_id": user, "items": ["5", "no-such"]},
        {"user_id": user, "items": []},
        {"user_id": user, "item_id": 2.5},
        {"user_id": user},
        {"user_id": user, "items": ["5"] * 1001},
        {"user_id": user, "item_id": "5", "event_id": ""},
        {"user_id": user, "item_id": "5", "event_id": 7},
        {"user_id": user, "item_id": "5", "event_id": "x" * 129},
    ):
        r = _post_events(recsys_server, body)
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    assert _recommend(recsys_server, {"user_id": user}).json()["source"] == "popularity"  # nothing appended
    assert _recommend(recsys_server, {"user_id": user}, key="wrong-key-123").status_code == 401
    bad_json = httpx.post(
        f"{recsys_server}/v1/recommendations",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{recsys_server}/health").json() == {"status": "ok", "history_store": "ok"}


class RedisServer:
    """A redis-server on a free loopback port, appending every write to its log before it answers
    (appendfsync always), so a restart loses nothing acknowledged."""

    def __init__(self, root: Path):
        exe = require_tool("redis-server", "redis-server")
        self.exe, self.root, self.port = exe, root, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.root),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)


def test_two_servers_share_histories_through_redis_and_lose_nothing_when_it_stops(trained, tmp_path) -> None:
    """Two `lmfleet recsys serve` processes on one Redis: an event posted to one changes the other's
    next answer exactly as offline; with Redis down, requests that need it get 503 (and the event is
    not acknowledged); once it is back, what was acknowledged before is still there."""
    data_dir, run = trained
    model, item_ids, data = _offline(trained)
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    common = ("--data", str(data_dir), "--api-key", KEY, "--history-store", redis_server.url, "--log-level", "warning")
    a, url_a = serve_process(run / "final", *common, command=("recsys", "serve"))
    b, url_b = serve_process(run / "final", *common, command=("recsys", "serve"))
    try:
        user = data.user_ids[7]
        first = _recommend(url_b, {"user_id": user, "k": 5}).json()["data"][0]["item_id"]
        event = {"user_id": user, "item_id": first, "event_id": "click-1"}
        assert _post_events(url_a, event).json()["repeat"] is False
        assert _post_events(url_b, event).json()["repeat"] is True  # a retry through the other server
        reused = _post_events(url_b, {**event, "item_id": item_ids[0] if first != item_ids[0] else item_ids[1]})
        assert reused.status_code == 409 and reused.json()["error"]["code"] == "event_id_conflict", reused.text
        # Event ids are per user, whatever the characters: ("a:b", "c") is not ("a", "b:c").
        assert _post_events(url_a, {"user_id": "a:b", "item_id": first, "event_id": "c"}).json()["repeat"] is False
        assert _post_events(url_a, {"user_id": "a", "item_id": first, "event_id": "b:c"}).json()["repeat"] is False
        history = data.sequence(7).tolist() + [item_ids.index(first) + 1]
        expected, _ = model.recommend(history, k=5)
        for url in (url_a, url_b):
            got = _recommend(url, {"user_id": user, "k": 5}).json()
            assert [d["item_id"] for d in got["data"]] == [item_ids[i - 1] for i in expected]
        redis_server.stop()
        down = _post_events(url_b, {"user_id": user, "item_id": item_ids[0]})
        assert down.status_code == 503 and down.json()["error"]["code"] == "history_store_unavailable", down.text
        assert _recommend(url_a, {"user_id": user}).status_code == 503
        health = httpx.get(f"{url_a}/health")  # still in rotation: the store is everyone's, history requests work
        assert health.status_code == 200 and health.json()["history_store"] == "unavailable"
        sent = _recommend(url_a, {"history": [item_ids[i - 1] for i in history], "k": 5})  # needs no store
        assert sent.status_code == 200
        redis_server.start()
        # The event id outlives the restart (and Redis's script cache, which does not).
        assert _post_events(url_b, event).json()["repeat"] is True
        for url in (url_a, url_b):
            got = _recommend(url, {"user_id": user, "k": 5}).json()
            assert [d["item_id"] for d in got["data"]] == [item_ids[i - 1] for i in expected]  # nothing lost
            assert got["history_length"] == len(history)  # and the refused event was not written
    finally:
        for proc in (a, b):
            stop_process(proc)
        redis_server.stop()


@pytest.mark.integration
def test_ray_replicas_answer_through_one_endpoint_with_shared_histories(trained, tmp_path) -> None:
    """`lmfleet recsys serve --replicas 2 --history-store redis://...`: one endpoint; an event
    posted through it changes the next answer whichever replica gives it (both answer); with Redis
    stopped, 503 and nothing acknowledged is lost once it is back; SIGTERM leaves no process."""
    import psutil

    data_dir, run = trained
    model, item_ids, data = _offline(trained)
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    lmfleet = str(Path(sys.executable).with_name("lmfleet"))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                lmfleet,
                "recsys",
                "serve",
                str(run / "final"),
                "--data",
                str(data_dir),
                "--port",
                str(port),
                "--replicas",
                "2",
                "--cpus-per-replica",
                "1",
                "--api-key",
                KEY,
                "--history-store",
                redis_server.url,
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_healthy(url, proc, 240, lambda: log.read_text()[-3000:])
        started = psutil.Process(proc.pid).children(recursive=True)
        user = data.user_ids[11]
        item = item_ids[0] if 1 not in data.sequence(11) else item_ids[1]
        assert _post_events(url, {"user_id": user, "item_id": item}).status_code == 200
        history = data.sequence(11).tolist() + [item_ids.index(item) + 1]
        expected = [item_ids[i - 1] for i in model.recommend(history, k=5)[0]]
        def served_by_replica() -> dict[str, float]:
            time.sleep(1.5)  # replicas push their metrics every half second
            served = {}
            for line in httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
                if line.startswith("lmfleet_recsys:requests_total{") and 'endpoint="recommendations"' in line:
                    replica = line.split('replica="', 1)[1].split('"', 1)[0]
                    served[replica] = served.get(replica, 0) + float(line.rsplit(" ", 1)[1])
            return served

        # The router picks the replica; load until both have answered (each answer checked).
        for _ in range(10):
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: _recommend(url, {"user_id": user, "k": 5}).json(), range(64)))
            assert all([d["item_id"] for d in a["data"]] == expected for a in answers), answers[0]
            served = served_by_replica()
            if len(served) == 2:
                break
        assert len(served) == 2 and all(v > 0 for v in served.values()), served  # both replicas answered
        # `lmfleet status` finds the recommender's application (in its own process: in this one it
        # would leave a Ray driver connected to a cluster that goes away with the server).
        status = subprocess.run([lmfleet, "status", "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["name"] == "lmfleet-recsys" and report["kind"] == "recsys", report
        assert report["deployments"]["RecsysReplica"]["replicas"] == {"RUNNING": 2}, report
        assert sorted(r["replica"] for r in report["replicas"]) == sorted(served), report
        assert sum(r["requests"] for r in report["replicas"]) >= sum(served.values()) + 1  # and the event
        assert _recommend(url, {"user_id": user}, key="wrong-key-123").status_code == 401  # keys at the ingress
        redis_server.stop()
        down = _post_events(url, {"user_id": user, "item_id": item_ids[2]})
        assert down.status_code == 503 and down.json()["error"]["code"] == "history_store_unavailable", down.text
        redis_server.start()
        again = _recommend(url, {"user_id": user, "k": 5}).json()
        assert [d["item_id"] for d in again["data"]] == expected and again["history_length"] == len(history)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        redis_server.stop()
    assert proc.returncode == 0, log.read_text()[-3000:]
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
