"""`lmfleet plot RUN_DIR`: loss.png with training and validation loss against tokens seen (for a
recommender run: against training positions, with validation NDCG@10 and HR@10 on a second axis)."""

from __future__ import annotations

from pathlib import Path

from lmfleet.errors import LmfleetError
from lmfleet.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise LmfleetError("plotting needs matplotlib: pip install 'lmfleet[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    # The last record of each step wins (a resumed run replays steps after its checkpoint).
    train = {r["step"]: r for r in records if r.get("kind") == "train"}
    evals = {r["step"]: r for r in records if r.get("kind") == "eval"}
    if not train:
        raise LmfleetError(f"{run_dir} has no training metrics (metrics.jsonl is missing or empty)")
    steps = sorted(train)
    tokens = [train[s]["tokens"] for s in steps]
    losses = [train[s]["loss"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(tokens, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    window = max(1, len(losses) // 25)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(tokens, smooth, color="tab:blue", linewidth=2, label=f"train loss ({window}-step mean)")
    e_steps = sorted(evals)
    recsys = any("val_ndcg@10" in evals[s] for s in e_steps)
    if evals:
        ax.plot([evals[s]["tokens"] for s in e_steps], [evals[s]["val_loss"] for s in e_steps], "o-",
                color="tab:orange", linewidth=2,
                label="validation loss (softmax over the catalog)" if recsys else "validation loss")
    handles, labels = ax.get_legend_handles_labels()
    if recsys:
        ax.set_xlabel("training positions seen (batch x sequence length, padding included)")
        ax.set_ylabel("training loss (nats per position)")
        quality = ax.twinx()
        for key, color in (("val_ndcg@10", "tab:green"), ("val_hr@10", "tab:red")):
            points = [s for s in e_steps if key in evals[s]]
            quality.plot([evals[s]["tokens"] for s in points], [evals[s][key] for s in points], "s--", color=color,
                         label=f"validation {key[4:].upper()}")
        quality.set_ylabel("validation HR@10 / NDCG@10 (full ranking)")
        more_handles, more_labels = quality.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    else:
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: {len(steps)} steps")
    ax.grid(alpha=0.3)
    ax.legend(handles, labels)
    out = Path(out) if out else run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
