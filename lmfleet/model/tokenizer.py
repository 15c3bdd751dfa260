"""Tokenizer: a byte-level BPE trained with `tokenizers`, or any Hugging Face `tokenizer.json`.

Also the chat template (Jinja, sandboxed, as transformers renders it) and an incremental
detokenizer that only ever emits whole UTF-8 characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmfleet.errors import CheckpointError, ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML with a BOS in front; the assistant turn ends with <|im_end|>, which is also a stop token.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode text, special token ids, and the chat template."""

    def __init__(self, backend: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # ---- ids -----------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: EOS and, for chat templates, the end-of-turn token."""
        ids = [self.eos_id, self.token_to_id(IM_END)]
        return sorted({i for i in ids if i is not None})

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the model's chat template (and tokenize without extra specials)."""
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat template; pass a plain prompt instead of messages")
        text = _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (transformers' layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a model directory."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory} has no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception on bad JSON
            raise CheckpointError(f"{path} is not a valid tokenizer file: {exc}") from None
        config: dict[str, Any] = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        max_len = config.get("model_max_length")
        return cls(backend, bos_token=_token_content(config.get("bos_token")),
                   eos_token=_token_content(config.get("eos_token")),
                   pad_token=_token_content(config.get("pad_token")), chat_template=template,
                   model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              length: int | None = None, add_bos: bool = True) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: any byte sequence is representable, nothing is <unk>)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                          f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    post = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        post.append(processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                  special_tokens=[(BOS, backend.token_to_id(BOS))]))
    backend.post_processor = processors.Sequence(post)
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=DEFAULT_CHAT_TEMPLATE)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a model or corpus directory."""
    return Tokenizer.from_dir(directory)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compiled_template(source: str) -> Any:
    if source not in _TEMPLATE_CACHE:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ConfigError(f"chat template rejected the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        try:
            _TEMPLATE_CACHE[source] = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the chat template does not compile: {exc}") from None
    return _TEMPLATE_CACHE[source]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation equals `decode(all ids)`.

    Byte-level tokens can split a UTF-8 character; a piece is held back while the decoded tail
    ends in U+FFFD (an incomplete character) and released once the character completes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; return the new text it completes (possibly "")."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text):]
        # The next decode starts one chunk back, so decoders that strip a leading space only
        # ever strip it from text already emitted.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text

    def flush(self) -> str:
        """Text still held back at the end of the stream (a genuinely broken trailing character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            piece = self.add(i)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail
