"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence.

Items are 1..num_items (0 pads). The item embedding both reads the sequence and scores the
next item (shared), positions are learned, blocks are pre-norm attention + feed-forward with
dropout. `model(history)` [B, L] gives scores of every item at every position [B, L, N + 1]
(padding scored -inf; `last_only=True`: after the last position only, [B, N + 1]); `model(x)`
with x [B, L, 1 + C] (history, then C candidate items per position) gives the candidates'
scores [B, L, C]. `recommend`/`recommend_rows` give top-k items that do not depend on the batch.
A directory holds config.json, model.safetensors and item_ids.json (the original ids).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.errors import CheckpointError, ConfigError

ARCHITECTURE = "SASRec"
LIMITS = {"num_items": 100_000_000, "hidden_size": 8192, "num_layers": 64, "num_heads": 64, "max_len": 4096}


@dataclass
class SASRecConfig:
    num_items: int = 0  # from the dataset
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 50  # history positions the model reads (the newest)
    dropout: float = 0.2
    ffn_multiplier: int = 1  # feed-forward width = hidden_size * this (SASRec: 1)
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-8

    def validate(self) -> SASRecConfig:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ConfigError(f"model.{name}={value!r} must be an integer in [1, {limit}]")
        if not isinstance(self.ffn_multiplier, int) or not 1 <= self.ffn_multiplier <= 16:
            raise ConfigError(f"model.ffn_multiplier={self.ffn_multiplier!r} must be an integer in [1, 16]")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not a multiple of model.num_heads={self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SASRecConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ConfigError(f"unknown SASRec setting(s) {[f'model.{k}' for k in bad]}; it takes {sorted(known)}")
        return cls(**values).validate()


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, h * cfg.ffn_multiplier)
        self.ffn_out = nn.Linear(h * cfg.ffn_multiplier, h)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]; `last_only`: the last position only, [B, H] (its keys and values
        still come from every position), its row-wise layers in blocks of ROW_BLOCK rows."""
        b, length, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # Every query, also for `last_only`: attention's kernel for one query rounds differently with
        # the thread count, and it is the cheap part.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  dropout_p=self.dropout.p if self.training else 0.0)
        if last_only:
            return in_row_blocks(lambda rows: self._rows(rows[:, :h], rows[:, h:]),
                                 torch.cat([x[:, -1], attended[:, :, -1].reshape(b, h)], dim=1))
        return self._rows(x, attended.transpose(1, 2).reshape(b, length, h))

    def _rows(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The position-wise rest of the block: output projection, residual, feed-forward."""
        x = x + self.dropout(self.out(attended))
        return x + self.dropout(self.ffn_out(self.dropout(F.gelu(self.ffn_in(self.ffn_norm(x))))))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> SASRec:
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                        * self.config.initializer_range)
        self.item_embedding.weight[0].zero_()
        return self

    def encode(self, history: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden state after every position [B, L, H] of left-padded histories [B, L] (`last_only`:
        after the last one, [B, H], which the last layer computes for that position alone)."""
        length = history.shape[1]
        if length > self.config.max_len:
            history, length = history[:, -self.config.max_len:], self.config.max_len
        real = history != 0
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=history.device)
        x = self.item_embedding(history) * math.sqrt(self.config.hidden_size) + self.position_embedding(positions)
        x = self.dropout(x) * real[..., None]
        idx = torch.arange(length, device=history.device)
        # Causal over real items; each position also sees itself, so padding rows are never empty.
        mask = ((idx[None, :, None] >= idx[None, None, :]) & real[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=history.device)[None]
        mask = mask[:, None]  # [B, 1, L, L]
        for i, layer in enumerate(self.layers):
            if last_only and i == len(self.layers) - 1:
                return self.norm(layer(x, mask, last_only=True) * real[:, -1, None])
            x = layer(x, mask) * real[..., None]
        return self.norm(x[:, -1] if last_only else x)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Scores [B, L, N + 1] of every item at every position of histories [B, L] (`last_only`:
        after the last position only, [B, N + 1], in float32 whatever the autocast); with x
        [B, L, 1 + C], the C candidates' scores [B, L, C]."""
        if x.dim() == 3:  # history and candidate items per position
            hidden = self.encode(x[..., 0])
            return (hidden[:, :, None, :] * self.item_embedding(x[..., 1:])).sum(-1)
        hidden = self.encode(x, last_only)
        if last_only:
            scores = score_rows(hidden, self.item_embedding.weight)
        else:
            scores = hidden @ self.item_embedding.weight.t()
        scores[..., 0] = float("-inf")
        return scores

    @torch.no_grad()
    def hidden_last(self, histories: list[np.ndarray] | list[list[int]]) -> torch.Tensor:
        """Hidden state [len(histories), H] after each whole history (its newest max_len items).
        The histories are padded to max_len and encoded ceil(ENCODE_ROWS / max_len) at a time, the
        last chunk filled with empty histories, so every matmul of the encoder has the same shape
        whatever the batch, and a history's state is the same bits in any batch."""
        device = self.item_embedding.weight.device
        length = self.config.max_len
        count = len(histories)
        if count == 0:
            return self.item_embedding.weight.new_zeros(0, self.config.hidden_size)
        chunk = -(-ENCODE_ROWS // length)
        batch = torch.zeros(-(-count // chunk) * chunk, length, dtype=torch.long)
        for row, h in enumerate(histories):
            h = list(h)[-length:]
            if h:
                batch[row, -len(h):] = torch.as_tensor(h, dtype=torch.long)
        batch = batch.to(device)
        return torch.cat([self.encode(batch[i:i + chunk], last_only=True) for i in range(0, len(batch), chunk)])[:count]

    @torch.no_grad()
    def score_last(self, histories: list[np.ndarray] | list[list[int]]) -> torch.Tensor:
        """Scores of every item [len(histories), N + 1] after each whole history, column 0 = -inf,
        in float32 (float64 for a float64 model): `hidden_last` then one item-table matmul."""
        scores = score_rows(self.hidden_last(histories), self.item_embedding.weight)
        scores[:, 0] = float("-inf")
        return scores

    @torch.no_grad()
    def recommend_rows(self, histories: list[Any], ks: list[int], excludes: list[Any],
                       max_norm: float | None = None) -> list[tuple[list[int], list[float]]]:
        """`recommend` for many histories at once (each its own k and exclusions): one forward,
        one item-table matmul, `top_k_rows` (`max_norm`: the table's `max_item_norm`, computed
        once by a caller whose weights do not change). Each answer is what the history alone
        would get."""
        return top_k_rows(self.hidden_last(histories), self.item_embedding.weight, ks, excludes, max_norm)

    @torch.no_grad()
    def recommend(self, history: list[int], k: int = 10, exclude_seen: bool = True) -> tuple[list[int], list[float]]:
        """The top `k` items after `history` (item indices 1..N) and their scores."""
        return self.recommend_rows([history], [k], [history if exclude_seen else []])[0]


# A GEMM's result for a row can depend on how many rows it has (small ones take other kernels: here
# 1-3 rows on one thread, 5-11 on two). On the serving path every matmul has a fixed shape: the
# encoder takes ceil(ENCODE_ROWS / max_len) histories at a time, the last layer's row-wise part
# ROW_BLOCK rows at a time.
ENCODE_ROWS = 128
ROW_BLOCK = 16


def in_row_blocks(fn: Any, rows: torch.Tensor) -> torch.Tensor:
    """fn over rows [B, D] ROW_BLOCK rows at a time (the last block zero-padded), so that each
    row's result is the same bits whatever B is."""
    count = rows.shape[0]
    padded = -(-count // ROW_BLOCK) * ROW_BLOCK
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, *rows.shape[1:])])
    return torch.cat([fn(rows[i:i + ROW_BLOCK]) for i in range(0, padded, ROW_BLOCK)])[:count]


def score_rows(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """hidden [B, H] @ table.T [H, N + 1], in float32 whatever the autocast (float64 for a float64
    model). Its low bits may depend on B (the kernel a GEMM picks); `top_k_rows` does not."""
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.to(dtype) @ table.to(dtype).t()


def _unit_roundoff(table: torch.Tensor) -> float:
    """A bound on the rounding unit of a matmul over `table`: float32's, or TF32's/bf16's where
    PyTorch may use them for float32 matmuls (CUDA's TF32 switch, the matmul precision setting)."""
    if table.dtype == torch.float64:
        return 2.0**-53
    try:
        precision = torch.get_float32_matmul_precision()
        tf32 = table.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the per-backend precision settings are in use: assume the loosest
        return 2.0**-8
    if precision == "medium":
        return 2.0**-8
    if precision == "high" or tf32:
        return 2.0**-11
    return 2.0**-24


EXACT_CHUNK = 1 << 16  # candidates rescored at a time (bounded memory whatever their number)


def exact_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of a [C, H] and b [C, H] in float64, the same bits whatever C, the
    device or the threads: the products of float32 values are exact in float64, and they are added
    in one fixed pairwise order by elementwise additions (no reduction kernel, whose order can
    vary). EXACT_CHUNK rows at a time."""
    if a.shape[0] > EXACT_CHUNK:
        return torch.cat([exact_dots(a[i:i + EXACT_CHUNK], b[i:i + EXACT_CHUNK])
                          for i in range(0, a.shape[0], EXACT_CHUNK)])
    products = a.double() * b.double()
    width = 1 << max(0, products.shape[1] - 1).bit_length()
    if width != products.shape[1]:
        products = F.pad(products, (0, width - products.shape[1]))
    while products.shape[1] > 1:
        half = products.shape[1] // 2
        products = products[:, :half] + products[:, half:]
    return products[:, 0]


def max_item_norm(table: torch.Tensor) -> float:
    """The largest Euclidean norm of a finite item row (a non-finite item never scores)."""
    norms = torch.linalg.vector_norm(table.detach().float(), dim=1)
    norms = norms[torch.isfinite(norms)]
    return float(norms.max()) * (1 + 1e-6) if len(norms) else 0.0  # (1 + 1e-6): the norm's own rounding


def top_k_rows(hidden: torch.Tensor, table: torch.Tensor, ks: list[int], excludes: list[Any],
               max_norm: float | None = None) -> list[tuple[list[int], list[float]]]:
    """The `ks[r]` best items (1..N) after hidden row r [B, H] and their scores, leaving out
    `excludes[r]`; highest first, equal scores by ascending id.

    One matmul scores the whole table; its result can differ in the last bits with the batch (a
    GEMM picks its kernel by shape), so it only finds candidates: every item within twice the
    matmul's error bound (gamma_H * |h| * max|t|, any summation order) of the k-th best surely
    holds the true top k. Their scores are recomputed by `exact_dots`, which ranks them, so an
    answer is the same bits whatever else is in the batch, the kernel or the thread count."""
    inf = float("inf")
    if hidden.shape[0] == 0:
        return []
    scores = score_rows(hidden, table)
    scores.nan_to_num_(nan=-inf, posinf=-inf, neginf=-inf)  # NaN or inf (a broken model): never recommended
    scores[:, 0] = -inf  # padding, not an item
    seen = [np.asarray(exclude, dtype=np.int64).ravel() for exclude in excludes]
    rows = np.repeat(np.arange(len(seen)), [len(x) for x in seen])
    cols = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    inside = (cols > 0) & (cols < scores.shape[1])
    if inside.any():
        scores[torch.from_numpy(rows[inside]).to(scores.device), torch.from_numpy(cols[inside]).to(scores.device)] = -inf
    width = min(max(ks, default=0), scores.shape[1])
    if width <= 0:
        return [([], []) for _ in ks]
    top = torch.topk(scores, width, dim=1, sorted=True).values
    finite = torch.isfinite(top).sum(1).tolist()  # a row with fewer finite items returns those
    ks = [min(k, n) for k, n in zip(ks, finite)]
    size, unit = hidden.shape[1], _unit_roundoff(table)
    if max_norm is None:
        max_norm = max_item_norm(table)
    if size * unit < 0.25:
        gamma = size * unit / (1 - size * unit)
        margins = (4 * gamma * max_norm) * hidden.double().norm(dim=1)  # 2 x the bound, x 2 to spare
    else:  # no useful bound (a very wide model at bf16 precision): every finite item is a candidate
        margins = torch.full((hidden.shape[0],), inf, dtype=torch.float64, device=hidden.device)
    cut = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=top.device)[:, None])[:, 0]
    low = torch.nan_to_num(cut.double() - margins, nan=-inf)
    # As float32, rounded down; never below the lowest finite score (-inf is never a candidate).
    threshold = low.to(scores.dtype)
    below = threshold.double() > low
    threshold[below] = torch.nextafter(threshold[below], threshold.new_tensor(-inf))
    threshold = threshold.clamp(min=-torch.finfo(scores.dtype).max)
    threshold[torch.tensor([k == 0 for k in ks], device=threshold.device)] = inf
    rows, items = torch.nonzero(scores >= threshold[:, None], as_tuple=True)  # by row, then ascending id
    exact = exact_dots(table[items], hidden[rows])
    exact.masked_fill_(~torch.isfinite(exact), -inf)
    order = torch.sort(exact, descending=True, stable=True).indices  # equal scores keep ascending ids
    order = order[torch.sort(rows[order], stable=True).indices]  # grouped by row again
    rows, items, exact = rows[order].tolist(), items[order].tolist(), exact[order].tolist()
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in ks]
    for row, item, value in zip(rows, items, exact):
        picked = out[row]
        if len(picked[0]) < ks[row] and value != -inf:  # (-inf sorts last: nothing finite follows)
            picked[0].append(item)
            picked[1].append(value)
    return out


def build_sasrec(config: SASRecConfig, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> SASRec:
    return SASRec(config.validate()).to(device=device, dtype=dtype).init_weights(seed)


def save_sasrec(model: SASRec, out_dir: str | Path, item_ids: list[str], extra: dict[str, Any] | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors (+ `tensors`, e.g. item popularity) + item_ids.json, written
    to a sibling temporary directory and moved into place (an old `out_dir` goes only then)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from lmfleet.files import publish_dir

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file({**state, **(tensors or {})}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({"architectures": [ARCHITECTURE], **model.config.to_dict(),
                                                     **(extra or {})}, indent=2) + "\n")
        (tmp / "item_ids.json").write_text(json.dumps(item_ids))
        tmp.chmod(0o755)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_sasrec_dir(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("architectures") == [ARCHITECTURE]
    except (OSError, ValueError, AttributeError):
        return False


def load_sasrec(path: str | Path, device: str | torch.device = "cpu") -> tuple[SASRec, list[str], dict[str, torch.Tensor]]:
    """The model (eval mode), its items' original ids and the other stored tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_sasrec_dir(path):
        raise CheckpointError(f"{path} is not a SASRec model directory (config.json with architectures "
                              f"[{ARCHITECTURE!r}])")
    raw = json.loads((path / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(SASRecConfig)}
    config = SASRecConfig.from_dict({k: v for k, v in raw.items() if k in fields})
    try:
        tensors = load_file(str(path / "model.safetensors"))
        item_ids = json.loads((path / "item_ids.json").read_text())
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot read the model ({exc})") from None
    if not isinstance(item_ids, list) or len(item_ids) != config.num_items:
        raise CheckpointError(f"{path}: item_ids.json does not list num_items={config.num_items} ids")
    with torch.device("meta"):
        model = SASRec(config)
    expected = model.state_dict()
    state = {k: tensors.pop(k) for k in list(tensors) if k in expected}
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in state if state[k].shape != expected[k].shape or not state[k].is_floating_point()]
    if missing or wrong:
        raise CheckpointError(f"{path}: model.safetensors lacks {missing[:4]} or has wrong shapes/dtypes for "
                              f"{wrong[:4]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.to(device).eval(), item_ids, tensors
