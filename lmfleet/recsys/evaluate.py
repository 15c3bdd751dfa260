"""HR@K and NDCG@K of a next-item scorer under leave-one-out, and the baselines that give every
number a reference (popularity, item-kNN).

Two protocols, each over the users with a target (>= 3 interactions):
- **full**: the target ranks against every item; the user's history is excluded (except the
  target itself, which the scorer cannot know).
- **sampled** (the SASRec paper's): the target ranks against `negatives` (100) items drawn
  uniformly from those not in the history, from a generator seeded by (seed, user).
Rank = items scored higher than the target, plus those scored equal with a lower id (so ties
are broken the same way for every scorer). HR@K = rank < K; NDCG@K = 1 / log2(rank + 2) then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lmfleet.errors import ConfigError
from lmfleet.recsys.data import RecData

Scorer = Callable[[list[np.ndarray]], torch.Tensor]  # histories -> scores [B, N + 1]
PROTOCOLS = ("full", "sampled")


def ranks_of(scores: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Rank (0 = best) of each row's target among the row's items not scored -inf (excluded), or
    among `candidates` [B, C] (the target is added to them). A NaN item counts as ahead of the
    target, and a target whose score is not finite ranks last: a model that diverged scores 0."""
    scores = scores.double()
    target_score = scores.gather(1, targets[:, None])
    if candidates is not None:
        ids = candidates
        cand = scores.gather(1, candidates)
    else:
        ids = torch.arange(scores.shape[1], device=scores.device)[None].expand_as(scores)
        cand = scores
    others = (cand != float("-inf")) & (ids != targets[:, None])
    ahead = (cand > target_score) | ((cand == target_score) & (ids < targets[:, None])) | torch.isnan(cand)
    ranks = (ahead & others).sum(1)
    return torch.where(torch.isfinite(target_score[:, 0]), ranks, others.sum(1))


def metrics_from_ranks(ranks: torch.Tensor, k: int) -> dict[str, float]:
    hit = (ranks < k).double()
    ndcg = hit / torch.log2(ranks.double() + 2)
    n = max(1, len(ranks))
    return {f"hr@{k}": float(hit.sum()) / n, f"ndcg@{k}": float(ndcg.sum()) / n}


def sampled_negatives(data: RecData, user: int, history: np.ndarray, target: int, count: int,
                      seed: int) -> np.ndarray:
    """`count` items the user has not interacted with, uniform, from a generator seeded by (seed,
    user); with fewer such items than `count`, drawn with repetition; a user who saw every item
    gets items of its history (it cannot be scored against unseen ones)."""
    rng = np.random.default_rng([seed, user])
    seen = np.unique(np.append(history, target))
    if data.num_items - len(seen) < count:
        pool = np.setdiff1d(np.arange(1, data.num_items + 1), seen)
        if not len(pool):
            pool = seen[seen != target]
        return rng.choice(pool, size=count, replace=len(pool) < count)
    out = rng.integers(1, data.num_items + 1, size=count)
    while True:  # redraw the seen ones (fewer than half on average: the pool is at least `count`)
        bad = np.isin(out, seen)
        if not bad.any():
            return out
        out[bad] = rng.integers(1, data.num_items + 1, size=int(bad.sum()))


MAX_NEGATIVES = 10_000
SCORE_BUDGET = 2**24  # scores [batch, N + 1] held at a time (x 8 bytes, twice)
ITEMKNN_MAX_ITEMS = 50_000  # item-kNN's similarity build is O(items x interactions)


def evaluate_scorer(scorer: Scorer, data: RecData, split: str = "test", protocols: Sequence[str] = PROTOCOLS,
                    k: int = 10, negatives: int = 100, seed: int = 0, max_users: int | None = None,
                    batch_size: int | None = None, users: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """{protocol: {"hr@K", "ndcg@K", "users"}} of a scorer on `split` ("valid" or "test")."""
    if split not in ("valid", "test"):
        raise ConfigError(f"split={split!r} must be 'valid' or 'test'")
    bad = sorted(set(protocols) - set(PROTOCOLS))
    if bad or not 1 <= k <= data.num_items:
        raise ConfigError(f"protocols {list(protocols)} must be among {list(PROTOCOLS)} and k={k} in [1, "
                          f"{data.num_items}] (the catalog)")
    if "sampled" in protocols and not 1 <= negatives <= min(MAX_NEGATIVES, data.num_items - 1):
        raise ConfigError(f"negatives={negatives} must be in [1, {min(MAX_NEGATIVES, data.num_items - 1)}] "
                          f"(the catalog has {data.num_items} items)")
    batch_size = batch_size or max(1, min(256, SCORE_BUDGET // (data.num_items + 1)))
    users = data.eval_users() if users is None else users
    if max_users is not None:
        users = users[:max_users]
    ranks: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    for lo in range(0, len(users), batch_size):
        chunk = users[lo:lo + batch_size]
        cases = [data.case(int(u), split) for u in chunk]
        histories = [h for h, _ in cases]
        targets = torch.tensor([t for _, t in cases], dtype=torch.long)
        scores = scorer(histories).detach().cpu().double()
        if "full" in ranks:
            full = scores.clone()
            for row, h in enumerate(histories):
                full[row, torch.as_tensor(h, dtype=torch.long)] = float("-inf")
            full[torch.arange(len(chunk)), targets] = scores[torch.arange(len(chunk)), targets]
            ranks["full"].append(ranks_of(full, targets))
        if "sampled" in ranks:
            cand = torch.as_tensor(np.stack([sampled_negatives(data, int(u), h, t, negatives, seed)
                                             for u, (h, t) in zip(chunk, cases)]), dtype=torch.long)
            ranks["sampled"].append(ranks_of(scores, targets, cand))
    return {p: {**metrics_from_ranks(torch.cat(r) if r else torch.zeros(0, dtype=torch.long), k),
                "users": int(len(users))} for p, r in ranks.items()}


def popularity_scorer(data: RecData) -> Scorer:
    """Every user gets the items most often trained on (ties: the lower id first)."""
    counts = torch.from_numpy(data.item_counts()).double()
    counts -= torch.arange(len(counts), dtype=torch.float64) * 1e-9  # a fixed order among equal counts
    counts[0] = float("-inf")
    return lambda histories: counts[None].expand(len(histories), -1)


def itemknn_scorer(data: RecData, neighbours: int = 100, chunk: int = 256) -> Scorer:
    """Item-based k-nearest neighbours: cosine similarity of items' training-user sets, each item
    keeping its `neighbours` most similar; a user's score of j = sum of sim(i, j) over history i."""
    n = data.num_items + 1
    rows, cols = [], []
    for u in range(data.num_users):
        items = np.unique(data.train_sequence(u))
        rows.append(np.full(len(items), u))
        cols.append(items)
    r, c = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols).astype(np.int64))
    x = torch.sparse_coo_tensor(torch.stack([r, c]), torch.ones(len(r)), (data.num_users, n),
                                check_invariants=True).coalesce()
    xt = x.t().coalesce()
    norms = torch.sqrt(torch.sparse.sum(x, 0).to_dense()).clamp_min(1e-12)
    keep = min(neighbours, n - 1)
    sim_rows, sim_cols, sim_vals = [], [], []
    x_dense_cols = x.to_dense() if data.num_users * n <= 50_000_000 else None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        block = torch.index_select(xt, 0, torch.arange(lo, hi)).to_dense()  # [c, users]
        co = block @ x_dense_cols if x_dense_cols is not None else torch.sparse.mm(x.t(), block.t()).t()
        co = co / norms[lo:hi, None] / norms[None]
        co[torch.arange(hi - lo), torch.arange(lo, hi)] = 0.0
        values, index = torch.topk(co, keep, dim=1)
        sim_rows.append(torch.arange(lo, hi).repeat_interleave(keep))
        sim_cols.append(index.flatten())
        sim_vals.append(values.flatten())
    sim = torch.sparse_coo_tensor(torch.stack([torch.cat(sim_rows), torch.cat(sim_cols)]), torch.cat(sim_vals),
                                  (n, n), check_invariants=True).coalesce()

    def score(histories: list[np.ndarray]) -> torch.Tensor:
        multi = torch.zeros(len(histories), n)
        for row, h in enumerate(histories):
            multi[row, torch.as_tensor(np.unique(h), dtype=torch.long)] = 1.0
        scores = torch.sparse.mm(sim.t(), multi.t()).t().double()
        scores[:, 0] = float("-inf")
        return scores

    return score


def evaluate_model_dir(model_dir: str | Path, data_dir: str | Path, split: str = "test", k: int = 10,
                       negatives: int = 100, seed: int = 0, max_users: int | None = None,
                       baselines: bool = True, allow_other_data: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """`lmfleet recsys eval`: the model and (with `baselines`) popularity and item-kNN (up to
    ITEMKNN_MAX_ITEMS items), each under both protocols on the same users and negatives. The
    dataset must be the one the model was trained on (its test items were never trained on),
    unless `allow_other_data`."""
    import json

    from lmfleet.recsys.model import load_sasrec

    data = RecData(data_dir)
    model, item_ids, _ = load_sasrec(model_dir)
    if item_ids != data.item_ids:
        raise ConfigError(f"{model_dir} was trained on another catalog ({len(item_ids)} items) than {data_dir} "
                          f"({data.num_items}): evaluate it on the dataset it was trained on")
    trained_on = json.loads((Path(model_dir) / "config.json").read_text()).get("dataset") or {}
    if not allow_other_data and trained_on.get("sha256") != data.identity()["sha256"]:
        raise ConfigError(f"{model_dir} was trained on {trained_on.get('path', 'another dataset')} (sha256 "
                          f"{str(trained_on.get('sha256'))[:12]}), not on {data_dir}: its test items may have "
                          "been training items there; pass --allow-other-data to evaluate anyway")
    if max_users is not None and max_users < 1:
        raise ConfigError(f"--max-users={max_users} must be >= 1")
    kwargs = {"split": split, "k": k, "negatives": negatives, "seed": seed, "max_users": max_users}
    result = {"model": evaluate_scorer(model.score_last, data, **kwargs)}
    if baselines:
        result["popularity"] = evaluate_scorer(popularity_scorer(data), data, **kwargs)
        if data.num_items <= ITEMKNN_MAX_ITEMS:
            result["itemknn"] = evaluate_scorer(itemknn_scorer(data), data, **kwargs)
    return result
