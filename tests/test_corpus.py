"""Corpus preparation: shards hold exactly the directly-encoded text, deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmfleet.data.corpus import Corpus, prepare_corpus, read_documents, resolve_sources, split_of
from lmfleet.errors import DataError
from lmfleet.model.tokenizer import load_tokenizer

from .helpers import run_cli


def _expected_streams(sources: list[str], corpus: Corpus, val_fraction: float) -> dict[str, list[int]]:
    tok = load_tokenizer(corpus.path)
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc in read_documents(resolve_sources(sources)):
        streams[split_of(doc, val_fraction)] += tok.encode(doc.text, add_special_tokens=False) + [tok.eos_id]
    return streams


def test_shards_equal_direct_encoding(text_dir, tmp_path) -> None:
    manifest = prepare_corpus([str(text_dir)], tmp_path / "c", vocab_size=500, val_fraction=0.3)
    corpus = Corpus(tmp_path / "c")
    assert corpus.dtype == np.uint16 and manifest["dtype"] == "uint16"
    expected = _expected_streams([str(text_dir)], corpus, 0.3)
    for split in ("train", "val"):
        assert corpus.tokens(split).tolist() == expected[split]
        assert manifest["splits"][split]["tokens"] == len(expected[split])
    assert manifest["splits"]["val"]["tokens"] > 0
    corpus.verify()


def test_deterministic_and_sharded(text_dir, tmp_path) -> None:
    a = prepare_corpus([str(text_dir)], tmp_path / "a", vocab_size=500, shard_tokens=500)
    b = prepare_corpus([str(text_dir)], tmp_path / "b", vocab_size=500, shard_tokens=500)
    assert a["splits"] == b["splits"]  # same shard files, token counts and SHA-256s
    assert len(a["splits"]["train"]["shards"]) > 1
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_single_file_still_gets_validation_tokens(text_dir, tmp_path) -> None:
    manifest = prepare_corpus([str(text_dir / "en.txt")], tmp_path / "c", vocab_size=300, val_fraction=0.1)
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert val == int((train + val) * 0.1)
    corpus = Corpus(tmp_path / "c")
    tok = corpus.tokenizer()
    whole = tok.encode((text_dir / "en.txt").read_text(), add_special_tokens=False) + [tok.eos_id]
    assert np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).tolist() == whole


def test_reuse_tokenizer_and_skip_binary(text_dir, tmp_path) -> None:
    first = prepare_corpus([str(text_dir)], tmp_path / "c1", vocab_size=400)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "note.txt").write_text("hello corpus")
    (extra / "blob.bin").write_bytes(bytes(range(256)))
    second = prepare_corpus([str(extra)], tmp_path / "c2", tokenizer=tmp_path / "c1")
    assert second["files_skipped"] == 1 and second["files_read"] == 1
    assert second["vocab_size"] == first["vocab_size"]


def test_bad_sources(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare_corpus([str(tmp_path / "nope")], tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        prepare_corpus([str(tmp_path / "empty")], tmp_path / "c")
    with pytest.raises(DataError, match="not a corpus directory"):
        Corpus(tmp_path)


@pytest.mark.integration
def test_stdlib_corpus_via_cli(tmp_path) -> None:
    result = run_cli("data", "prepare", "--source", "stdlib", "--out", str(tmp_path / "c"), "--vocab-size", "2048")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "val" in result.stdout and "stdlib" in result.stdout
    corpus = Corpus(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["sources"][0]["source"] == "stdlib" and manifest["files_read"] > 100
    expected = _expected_streams(["stdlib"], corpus, manifest["val_fraction"])
    for split in ("train", "val"):
        assert corpus.tokens(split).tolist() == expected[split]


def test_prepare_never_deletes_what_it_did_not_write(text_dir, tmp_path) -> None:
    """`data prepare --out runs` where runs/ holds training runs is refused and leaves runs/ as it
    was; a corpus already there is replaced only with --overwrite."""
    from .helpers import assert_one_line_error, run_cli

    runs = tmp_path / "runs"
    (runs / "tiny" / "final").mkdir(parents=True)
    (runs / "tiny" / "final" / "model.safetensors").write_bytes(b"weights")
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    result = run_cli("data", "prepare", "--source", str(text_dir), "--out", str(runs), "--vocab-size", "300")
    assert_one_line_error(result, "is not empty and holds no corpus")
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before
    assert (runs / "tiny" / "final" / "model.safetensors").read_bytes() == b"weights"

    corpus = tmp_path / "corpus"
    first = prepare_corpus([str(text_dir / "en.txt")], corpus, vocab_size=300)
    again = run_cli("data", "prepare", "--source", str(text_dir), "--out", str(corpus), "--vocab-size", "300")
    assert_one_line_error(again, "already holds a corpus", "--overwrite")
    assert Corpus(corpus).manifest["files_read"] == first["files_read"] == 1
    replaced = run_cli("data", "prepare", "--source", str(text_dir), "--out", str(corpus), "--vocab-size", "300",
                       "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert Corpus(corpus).manifest["files_read"] == len([p for p in text_dir.rglob("*") if p.is_file()])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]  # no temporary left behind
