"""Tokenizer from GGUF metadata and from tokenizer.json, against transformers; chat templates."""

import pytest
from helpers import CHAT_TEMPLATE

from plora_jax import Tokenizer

TEXTS = [
    "Hello world",
    "  two leading spaces, digits 12345 and 3.14159",
    "Ünïcödé ✓ 日本語 🤖!",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n\treturn x**2  # comment\n\n\n",
    "it's we'll they'd I'M",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]


def test_gguf_tokenizer_matches_transformers(engine, hf_tokenizer):
    tok = engine.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>") == [1]  # control tokens are single special tokens
    assert tok.decode([1, 19556], skip_special_tokens=True) == "Hello"
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)


def test_chat_template_matches_transformers(engine, hf_tokenizer):
    for messages in (MESSAGES, MESSAGES[1:2]):
        for gen in (True, False):
            ours = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            ref = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == ref
    ids = engine.tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    assert (
        ids
        == hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def test_save_load_round_trip(engine, tmp_path):
    engine.tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    for text in TEXTS:
        assert loaded.encode(text) == engine.tokenizer.encode(text)
    assert loaded.meta == engine.tokenizer.meta


def test_hf_folder_tokenizer(hf_tokenizer, engine, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == engine.tokenizer.encode(text)
    assert tok.apply_chat_template(MESSAGES) == engine.tokenizer.apply_chat_template(MESSAGES)
    assert 2 in tok.eos_token_ids


def test_chat_template_errors(engine):
    tok = engine.tokenizer
    with pytest.raises(ValueError, match=r"messages\[1\]\.role must be a string"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content is missing"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="list of"):
        tok.apply_chat_template("hello")
    assert tok.apply_chat_template(MESSAGES[1:2], chat_template=CHAT_TEMPLATE).endswith("<|im_start|>assistant\n")
