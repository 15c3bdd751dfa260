"""Shared fixtures: small text corpora and a tokenizer trained on them (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

# CI explores the same examples on every run, so a run lands or fails on the code, not on luck;
# a local run draws new examples each time and finds new edge cases.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SAMPLE_TEXTS = {
    "en.txt": "The quick brown fox jumps over the lazy dog. " * 40,
    "code.py": "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 30,
    "cjk.txt": "分布式训练与推理。大型语言模型的云端部署。日本語のテキストも少し。한국어 문장도 있습니다. " * 20,
    "emoji.md": "# Notes 🚀\n\n- fast ⚡ and small 🐭\n- naïve café, Zürich, Ελληνικά, русский\n" * 25,
    "sub/more.txt": "Data flows one way: text, data, train, checkpoint, engine, serve, cluster.\n" * 30,
}


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    for name, text in SAMPLE_TEXTS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tokenizer(text_dir: Path):
    from lmfleet.model.tokenizer import train_bpe

    texts = [p.read_text(encoding="utf-8") for p in sorted(text_dir.rglob("*")) if p.is_file()]
    return train_bpe(texts, vocab_size=400)
