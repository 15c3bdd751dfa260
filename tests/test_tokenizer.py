"""Tokenizer: lossless round trip, streaming detokenization, chat template vs transformers."""

from __future__ import annotations

import json

import pytest
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmfleet.model.tokenizer import BOS, EOS, IM_END, Tokenizer, load_tokenizer

VARIED = [
    "",
    "plain ascii text",
    "emoji 🚀🐭⚡ family 👨‍👩‍👧‍👦 flags 🇯🇵🇩🇪",
    "中文分布式训练，日本語のテキスト，한국어",
    "mixed: naïve café — “quotes” ¼ ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "tabs\tand\nnewlines\r\n  indented\n\n",
    "zero\x00byte and control \x07 chars",
]


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_round_trip_arbitrary_unicode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", VARIED)
def test_round_trip_varied_fixture(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id  # BOS is added by the post-processor
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    detok = tokenizer.detokenizer(skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@given(st.text(max_size=120))
@example("\ufffd")  # a literal U+FFFD is text, not a broken character
@example("a\ufffdb\ufffd")
@settings(max_examples=200, deadline=None)
def test_streaming_detokenization_equals_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    if "\ufffd" not in text:  # never a broken character mid-stream
        assert not any("\ufffd" in p for p in pieces)


@given(st.lists(st.integers(min_value=0, max_value=399), max_size=60))
@settings(max_examples=200, deadline=None)
def test_streaming_any_token_sequence(tokenizer: Tokenizer, ids: list[int]) -> None:
    # Arbitrary ids can spell invalid UTF-8; the stream must still add up to the full decode.
    for skip in (False, True):
        assert "".join(_stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_multibyte_character_is_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # a 4-byte emoji unseen in training splits into byte tokens
    detok = tokenizer.detokenizer()
    pieces = [detok.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀"


def test_saved_tokenizer_matches_transformers(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in VARIED:
        assert hf.encode(text) == ours.encode(text) == tokenizer.encode(text)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi 👋"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    for add in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
    rendered = ours.apply_chat_template(messages)
    assert rendered.startswith(BOS) and rendered.endswith("<|im_start|>assistant\n")
    assert ours.token_to_id(IM_END) in ours.stop_ids and ours.token_to_id(EOS) in ours.stop_ids


def test_chat_template_read_from_tokenizer_config(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"


def test_bad_tokenizer_files_name_the_problem(tmp_path) -> None:
    from lmfleet.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer file"):
        load_tokenizer(tmp_path)
