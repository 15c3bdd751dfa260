"""SASRec quality on MovieLens-100K: lmfleet against RecBole's SASRec, same leave-one-out split,
full ranking over the catalog (history excluded), HR@10 and NDCG@10, with training time.

RecBole runs from its own virtual environment (see BENCHMARK-PEERS: `pip install torch==2.13.0
recbole==1.2.1 "numpy<2" "pandas<2.3" "scipy<1.14" "setuptools<70"`), never as an lmfleet
dependency; lmfleet runs `lmfleet recsys prepare|train|eval` on the same `.inter` file.

    python benchmarks/recsys_vs_recbole.py --inter ../shared/data/ml-100k/ml-100k.inter \\
        --recbole-python /path/to/recbole-venv/bin/python --epochs 50

prints one JSON line per side and a summary. RecBole's settings are its SASRec defaults (hidden
64, 2 layers, 2 heads, max length 50, CE loss, Adam 1e-3, batch 2048... as listed in CONFIG)
with early stopping on validation NDCG@10.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LMFLEET = str(Path(sys.executable).with_name("lmfleet"))
CONFIG = """
model: SASRec
dataset: {name}
data_path: {data_path}
load_col: {{inter: [user_id, item_id, timestamp]}}
USER_ID_FIELD: user_id
ITEM_ID_FIELD: item_id
TIME_FIELD: timestamp
MAX_ITEM_LIST_LENGTH: {max_len}
eval_args: {{split: {{LS: valid_and_test}}, order: TO, mode: full, group_by: user}}
metrics: [Hit, NDCG]
topk: [10]
valid_metric: NDCG@10
train_neg_sample_args: ~
loss_type: CE
epochs: {epochs}
stopping_step: {stopping}
train_batch_size: {batch}
eval_batch_size: 4096
learning_rate: 0.001
hidden_size: 64
inner_size: 256
n_layers: 2
n_heads: 2
hidden_dropout_prob: 0.2
attn_dropout_prob: 0.2
seed: 0
reproducibility: true
show_progress: false
device: cpu
use_gpu: false
checkpoint_dir: {checkpoints}
"""
RUNNER = """
import json, sys, time
from recbole.quick_start import run_recbole
start = time.perf_counter()
result = run_recbole(model="SASRec", dataset=sys.argv[1], config_file_list=[sys.argv[2]])
print("RESULT " + json.dumps({"test": {k: float(v) for k, v in result["test_result"].items()},
                               "valid": {k: float(v) for k, v in result["best_valid_result"].items()},
                               "seconds": time.perf_counter() - start}))
"""


def recbole(args: argparse.Namespace, root: Path) -> dict:
    name = args.inter.stem
    data_path = root / "recbole-data"
    (data_path / name).mkdir(parents=True)
    (data_path / name / f"{name}.inter").write_bytes(args.inter.read_bytes())
    config = root / "sasrec.yaml"
    config.write_text(CONFIG.format(name=name, data_path=data_path, max_len=args.max_len, epochs=args.epochs,
                                    stopping=args.stopping_step, batch=args.recbole_batch,
                                    checkpoints=root / "recbole-ckpt"))
    runner = root / "run_recbole.py"
    runner.write_text(RUNNER)
    # RecBole 1.2.1 reloads its own best checkpoint with torch.load, which torch >= 2.6 refuses by
    # default (weights_only): allowed for RecBole's process only, on the file it just wrote.
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = subprocess.run([args.recbole_python, str(runner), name, str(config)], capture_output=True, text=True,
                         cwd=root, timeout=6 * 3600, env=env)
    found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not found:
        raise RuntimeError(f"RecBole failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = json.loads(found[-1][len("RESULT "):])
    test = {k.lower(): v for k, v in result["test"].items()}
    epochs = len(re.findall(r"epoch \d+ training", out.stdout + out.stderr))
    return {"side": "recbole", "hr@10": test["hit@10"], "ndcg@10": test["ndcg@10"], "seconds": result["seconds"],
            "epochs": epochs}


def lmfleet(args: argparse.Namespace, root: Path) -> dict:
    data = root / "lmfleet-data"
    subprocess.run([LMFLEET, "recsys", "prepare", "--interactions", str(args.inter), "--out", str(data)], check=True,
                   capture_output=True)
    start = time.perf_counter()
    subprocess.run([LMFLEET, "recsys", "train", str(args.config), "--data", str(data), "--out", str(root / "run")],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    out = subprocess.run([LMFLEET, "recsys", "eval", str(root / "run" / "final"), "--data", str(data), "--json"],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    return {"side": "lmfleet", "hr@10": result["model"]["full"]["hr@10"], "ndcg@10": result["model"]["full"]["ndcg@10"],
            "seconds": seconds, "sampled": result["model"]["sampled"],
            "popularity": result["popularity"]["full"], "itemknn": result.get("itemknn", {}).get("full")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inter", type=Path, required=True, help="a RecBole .inter file")
    parser.add_argument("--recbole-python", required=True, help="the python of RecBole's own venv")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" /
                        "sasrec-ml100k.toml")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--stopping-step", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--recbole-batch", type=int, default=256)
    parser.add_argument("--skip-recbole", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = [lmfleet(args, root)]
        print(json.dumps(results[-1]), flush=True)
        if not args.skip_recbole:
            results.append(recbole(args, root))
            print(json.dumps(results[-1]), flush=True)
    for r in results:
        print(f"{r['side']:8s} full HR@10 {r['hr@10']:.4f}  NDCG@10 {r['ndcg@10']:.4f}  training {r['seconds']:.0f} s")
    if len(results) == 2:
        print(f"NDCG@10 lmfleet / RecBole: {results[0]['ndcg@10'] / results[1]['ndcg@10']:.3f}")


if __name__ == "__main__":
    main()
