"""Tokenizer: a `tokenizers` BPE built from GGUF metadata or read from tokenizer.json, plus chat
templates rendered with jinja2.

GGUF stores a byte-level BPE as three arrays (`tokenizer.ggml.tokens`, `.merges`, `.token_type`)
and names its pre-tokenizer (`tokenizer.ggml.pre`). We rebuild the same pipeline llama.cpp runs
for that name: a byte-level regex split (GPT-2's, or Llama 3's), preceded for the StarCoder
family (SmolLM included) by a split into single digits. Control tokens (type 3) become special
added tokens so `<|im_start|>` in a rendered chat prompt encodes to one id.

BOS/EOS follow the model's metadata: BOS is prepended by the post-processor only when the model
says so (`tokenizer.ggml.add_bos_token`, or the tokenizer.json post-processor); the EOS set used
to stop generation merges eos, end-of-turn ids and generation_config.json's `eos_token_id`.

A built tokenizer saves itself (tokenizer.json + a small meta JSON) so that a cached model start
never reopens the GGUF file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` name (the patterns llama.cpp uses).
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRES = {None, "default", "gpt2", "gpt-2", "olmo", "jais"}
_LLAMA3_PRES = {"llama-bpe", "llama3", "smaug-bpe"}
_QWEN2_PRES = {"qwen2"}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclass
class TokenizerMeta:
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    source: str = ""


def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRES:
        return byte_level
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRES | _QWEN2_PRES:
        pattern = _LLAMA3_PATTERN if pre in _LLAMA3_PRES else _QWEN2_PATTERN
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    log.warning("%s: tokenizer.ggml.pre=%r is not known; using GPT-2's pre-tokenizer", path, pre)
    return byte_level


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The conventions of HF chat templates: trimmed blocks, `tojson`, `raise_exception`.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model. Thread-safe for encode/decode (tokenizers is)."""

    def __init__(self, backend, meta: TokenizerMeta):
        self._tok = backend  # tokenizers.Tokenizer
        self.meta = meta
        self._special_ids = {
            backend.token_to_id(t.content) for t in backend.get_added_tokens_decoder().values() if t.special
        }
        self._max_token_chars: int | None = None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader, path: Path) -> Tokenizer:
        from tokenizers import AddedToken, decoders, models, processors
        from tokenizers import Tokenizer as Backend

        from .models.convert import CheckpointError

        def value(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = value("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (gpt2 byte-level BPE)")
        tokens = value("tokenizer.ggml.tokens")
        merges = value("tokenizer.ggml.merges") or []
        types = value("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not tokens:
            raise CheckpointError(f"{path}: missing metadata field tokenizer.ggml.tokens")
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        backend.pre_tokenizer = _pre_tokenizer(value("tokenizer.ggml.pre"), path)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types)
                if t == TOKEN_TYPE_CONTROL
            ]
        )
        backend.add_tokens(
            [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED]
        )
        bos = value("tokenizer.ggml.bos_token_id")
        if value("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_text = tokens[int(bos)]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, int(bos))]
            )
        eos = [
            value(k)
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        ]
        meta = TokenizerMeta(
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=sorted({int(e) for e in eos if e is not None}),
            chat_template=value("tokenizer.chat_template"),
            source=str(path),
        )
        return cls(backend, meta)

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        from .models.convert import CheckpointError

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json in this folder")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
        config = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())

        def token_id(entry) -> int | None:
            text = entry.get("content") if isinstance(entry, dict) else entry
            return None if text is None else backend.token_to_id(text)

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        eos = {token_id(config.get("eos_token"))}
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        meta = TokenizerMeta(
            bos_token_id=token_id(config.get("bos_token")),
            eos_token_ids=sorted(int(e) for e in eos if e is not None),
            chat_template=template,
            source=str(folder),
        )
        return cls(backend, meta)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_meta.json").write_text(json.dumps(asdict(self.meta)))

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        meta = TokenizerMeta(**json.loads((folder / "tokenizer_meta.json").read_text()))
        return cls(Backend.from_file(str(folder / "tokenizer.json")), meta)

    # --- use --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token decodes to: its vocabulary string's length
        (a byte-level or sentencepiece piece spells each byte or character with one symbol).
        A text longer than this times the context cannot fit it, which a server checks before
        spending time on tokenizing it."""
        if self._max_token_chars is None:
            self._max_token_chars = max(1, max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1))
        return self._max_token_chars

    @property
    def bos_token_id(self) -> int | None:
        return self.meta.bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.meta.eos_token_ids)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self._special_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added only if the model's tokenizer asks for it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template.

        Returns the prompt text (or its token ids with `tokenize=True`; the template already
        holds any BOS text, so no special tokens are added when encoding it). Unlike
        transformers, the defaults suit generation: a generation prompt, text out.
        """
        template = chat_template or self.meta.chat_template
        if not template:
            raise ValueError(f"{self.meta.source}: the model has no chat template; pass chat_template=")
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}].role must be a string")
            if "content" not in m:
                raise ValueError(f"messages[{i}].content is missing")
        special = {
            "bos_token": self._text_of(self.meta.bos_token_id),
            "eos_token": self._text_of(self.meta.eos_token_ids[0] if self.meta.eos_token_ids else None),
        }
        from jinja2.exceptions import TemplateError

        try:
            text = _compile_template(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **{**special, **kwargs}
            )
        except TemplateError as e:  # the template refused these messages (raise_exception), or the sandbox did
            raise ValueError(f"messages: the chat template refused them: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")
