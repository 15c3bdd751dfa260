"""Corpus preparation: shards hold exactly the directly-encoded text, deterministically. The
expected tokens come from the source files read here and encoded by the `tokenizers` library
from the corpus's saved tokenizer.json, not through lmfleet's reading or tokenizer code."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmfleet.data.corpus import Corpus, prepare_corpus
from lmfleet.errors import DataError

from .helpers import run_cli

# The stdlib source: its .py files outside these directories (docs/data.md).
STDLIB_LEFT_OUT = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def _text_files(root: Path) -> list[tuple[str, Path]]:
    """(name relative to the source, path) of every non-hidden file, in name order."""
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    return sorted((name, p) for name, p in files if not any(part.startswith(".") for part in name.split("/")))


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")]
    return sorted((name, p) for name, p in files if not STDLIB_LEFT_OUT.intersection(name.split("/")[:-1]))


def _in_val(name: str, val_fraction: float) -> bool:
    """The documented split: SHA-256 of the name, first 8 bytes as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64 < val_fraction


def _expected_streams(files: list[tuple[str, Path]], corpus_dir: Path, val_fraction: float) -> dict[str, list[int]]:
    hf = HFTokenizer.from_file(str(corpus_dir / "tokenizer.json"))
    eos = hf.token_to_id(json.loads((corpus_dir / "tokenizer_config.json").read_text())["eos_token"])
    assert eos is not None
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for name, path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "\x00" in text or not text.strip():
            continue
        split = "val" if _in_val(name, val_fraction) else "train"
        streams[split] += hf.encode(text, add_special_tokens=False).ids + [eos]
    return streams


def test_shards_equal_direct_encoding(text_dir, tmp_path) -> None:
    manifest = prepare_corpus([str(text_dir)], tmp_path / "c", vocab_size=500, val_fraction=0.3)
    corpus = Corpus(tmp_path / "c")
    assert corpus.dtype == np.uint16 and manifest["dtype"] == "uint16"
    expected = _expected_streams(_text_files(text_dir), tmp_path / "c", 0.3)
    assert expected["val"] and expected["train"]  # documents hashed into both splits
    for split in ("train", "val"):
        assert corpus.tokens(split).tolist() == expected[split]
        assert manifest["splits"][split]["tokens"] == len(expected[split])
    corpus.verify()


def test_deterministic_and_sharded(text_dir, tmp_path) -> None:
    a = prepare_corpus([str(text_dir)], tmp_path / "a", vocab_size=500, shard_tokens=500)
    b = prepare_corpus([str(text_dir)], tmp_path / "b", vocab_size=500, shard_tokens=500)
    assert a["splits"] == b["splits"]  # same shard files, token counts and SHA-256s
    assert len(a["splits"]["train"]["shards"]) > 1
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    # What a training checkpoint records of its corpus: the same for both, another for other text.
    assert Corpus(tmp_path / "a").identity()["sha256"] == Corpus(tmp_path / "b").identity()["sha256"]
    prepare_corpus([str(text_dir / "en.txt")], tmp_path / "other", tokenizer=tmp_path / "a")
    assert Corpus(tmp_path / "other").identity()["sha256"] != Corpus(tmp_path / "a").identity()["sha256"]


def test_single_file_still_gets_validation_tokens(text_dir, tmp_path) -> None:
    manifest = prepare_corpus([str(text_dir / "en.txt")], tmp_path / "c", vocab_size=300, val_fraction=0.1)
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert val == int((train + val) * 0.1)
    corpus = Corpus(tmp_path / "c")
    expected = _expected_streams([("en.txt", text_dir / "en.txt")], tmp_path / "c", 0.0)
    assert np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).tolist() == expected["train"]


def test_reuse_tokenizer_and_skip_binary(text_dir, tmp_path) -> None:
    first = prepare_corpus([str(text_dir)], tmp_path / "c1", vocab_size=400)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "note.txt").write_text("hello corpus")
    (extra / "blob.bin").write_bytes(bytes(range(256)))
    second = prepare_corpus([str(extra)], tmp_path / "c2", tokenizer=tmp_path / "c1")
    assert second["files_skipped"] == 1 and second["files_read"] == 1
    assert second["vocab_size"] == first["vocab_size"]
    # Encoded with the first corpus's tokenizer, as the tokenizers library reads it from there.
    tokens = np.concatenate([Corpus(tmp_path / "c2").tokens(s) for s in ("train", "val")]).tolist()
    assert tokens == _expected_streams([("note.txt", extra / "note.txt")], tmp_path / "c1", 0.0)["train"]


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
    files = _stdlib_files()
    assert manifest["sources"][0]["files"] == len(files)
    expected = _expected_streams(files, tmp_path / "c", manifest["val_fraction"])
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
