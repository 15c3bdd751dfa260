"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence.

Items are 1..num_items (0 pads). The item embedding both reads the sequence and scores the
next item (shared), positions are learned, blocks are pre-norm attention + feed-forward with
dropout. `model(history)` [B, L] gives scores of every item at every position [B, L, N + 1]
(padding scored -inf; `last_only=True`: after the last position only, [B, N + 1]); `model(x)` with x [B, L, 1 + C] (history, then C candidate items per
position) gives the candidates' scores [B, L, C]. A directory holds config.json,
model.safetensors and item_ids.json (the original ids).
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  dropout_p=self.dropout.p if self.training else 0.0)
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(b, length, h)))
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

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Hidden state after every position [B, L, H] of left-padded histories [B, L]."""
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
        for layer in self.layers:
            x = layer(x, mask) * real[..., None]
        return self.norm(x)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Scores [B, L, N + 1] of every item at every position of histories [B, L] (`last_only`:
        after the last position only, [B, N + 1], in float32 whatever the autocast); with x
        [B, L, 1 + C], the C candidates' scores [B, L, C]."""
        if x.dim() == 3:  # history and candidate items per position
            hidden = self.encode(x[..., 0])
            return (hidden[:, :, None, :] * self.item_embedding(x[..., 1:])).sum(-1)
        hidden = self.encode(x)
        if last_only:
            scores = score_rows(hidden[:, -1], self.item_embedding.weight)
        else:
            scores = hidden @ self.item_embedding.weight.t()
        scores[..., 0] = float("-inf")
        return scores

    @torch.no_grad()
    def score_last(self, histories: list[np.ndarray] | list[list[int]]) -> torch.Tensor:
        """Scores of every item [len(histories), N + 1] after each whole history (its newest
        max_len items), column 0 = -inf: one forward over the histories padded to max_len, then
        the item-table matmul in blocks of SCORE_BLOCK rows. A history's scores are the same bits
        whatever else is in its batch (see `score_rows`)."""
        device = self.item_embedding.weight.device
        length = self.config.max_len
        batch = torch.zeros(len(histories), length, dtype=torch.long)
        for row, h in enumerate(histories):
            h = list(h)[-length:]
            if h:
                batch[row, -len(h):] = torch.as_tensor(h, dtype=torch.long)
        return self(batch.to(device), last_only=True)

    @torch.no_grad()
    def recommend(self, history: list[int], k: int = 10, exclude_seen: bool = True) -> tuple[list[int], list[float]]:
        """The top `k` items after `history` (item indices 1..N) and their scores."""
        return top_k(self.score_last([history])[0], k, history if exclude_seen else ())


# Rows of one item-table matmul. A GEMM's result for a row can depend on how many rows it has (small
# ones take other kernels: here 1-3 rows on one thread, 5-11 on two); every block having this many
# rows makes a history's scores independent of its batch.
SCORE_BLOCK = 16


def score_rows(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """hidden [B, H] @ table.T [H, N + 1] in float32 (float64 for a float64 model), computed
    SCORE_BLOCK rows at a time (the last block zero-padded), so each row's scores are the same bits
    whatever B is."""
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    hidden, table = hidden.to(dtype), table.to(dtype)
    rows = hidden.shape[0]
    padded = -(-rows // SCORE_BLOCK) * SCORE_BLOCK
    if padded != rows:
        hidden = torch.cat([hidden, hidden.new_zeros(padded - rows, hidden.shape[1])])
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.cat([hidden[i:i + SCORE_BLOCK] @ table.t() for i in range(0, padded, SCORE_BLOCK)])[:rows]


def top_k(scores: torch.Tensor, k: int, exclude: Any = ()) -> tuple[list[int], list[float]]:
    """The `k` best items of one score row [N + 1], leaving out `exclude`; ties go to the lower id."""
    items, values = top_k_rows(scores[None], [k], [exclude])[0]
    return items, values


def top_k_rows(scores: torch.Tensor, ks: list[int], excludes: list[Any]) -> list[tuple[list[int], list[float]]]:
    """`top_k` of every row of scores [B, N + 1] at once (each row its own k and exclusions): one
    top-k over the batch, then ties at each row's cut-off resolved to the lower ids, so the answer
    does not depend on the kernel or on the other rows."""
    scores = torch.nan_to_num(scores, nan=float("-inf"))  # a copy; a NaN is never recommended
    for row, exclude in enumerate(excludes):
        seen = torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=scores.device)
        seen = seen[(seen > 0) & (seen < scores.shape[1])]
        if len(seen):
            scores[row, seen] = float("-inf")
    finite = torch.isfinite(scores).sum(1).tolist()
    ks = [min(k, n) for k, n in zip(ks, finite)]
    width = max(ks, default=0)
    if width == 0:
        return [([], []) for _ in ks]
    values, items = torch.topk(scores, width, dim=1, sorted=True)
    out = []
    for row, k in enumerate(ks):
        if k == 0:
            out.append(([], []))
            continue
        v, i = values[row, :k], items[row, :k]
        cut = v[-1]
        if int((scores[row] == cut).sum()) > int((v == cut).sum()):  # more items tie at the cut than were taken
            above = i[v > cut]
            tied = torch.nonzero(scores[row] == cut).flatten()[: k - len(above)]
            i = torch.cat([above, tied])
            v = scores[row, i]
        # Highest score first, equal scores by ascending id.
        order = torch.argsort(i, stable=True)
        i, v = i[order], v[order]
        order = torch.argsort(v, descending=True, stable=True)
        out.append((i[order].tolist(), v[order].double().tolist()))
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
