"""Flags generated from the config dataclasses, and the generation demo end to end on a tiny GGUF."""

import pytest
from helpers import write_tiny_gguf

from plora_jax.cli import dataclass_from_args
from plora_jax.config import EngineConfig
from plora_jax.engine.sampling import SamplingParams
from plora_jax.generate import build_parser, main


def test_every_config_field_is_a_flag():
    args = build_parser().parse_args(
        [
            "--max-num-seqs",
            "3",
            "--no-param-cache",
            "--dtype",
            "float32",
            "--top-p",
            "0.5",
            "--stop-token-ids",
            "4",
            "7",
            "--ignore-eos",
        ]
    )
    config = dataclass_from_args(EngineConfig, args)
    assert config.max_num_seqs == 3 and config.param_cache is False and config.dtype == "float32"
    sampling = dataclass_from_args(SamplingParams, args, exclude=("seed",))
    assert sampling.top_p == 0.5 and sampling.stop_token_ids == (4, 7) and sampling.ignore_eos
    assert sampling.max_tokens == 64 and sampling.temperature == 0.0  # demo defaults
    assert config.warmup is False


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_generate_demo_runs(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "Q8_0")
    code = main(
        [
            "--model",
            str(path),
            "--cache-dir",
            str(tmp_path),
            "--max-model-len",
            "64",
            "--num-kv-blocks",
            "16",
            "--prompt",
            "the cat",
            "--max-tokens",
            "5",
            "--ignore-eos",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and ">>> the cat" in out and "[5 tokens, finish_reason=length]" in out
    assert "loaded in" in err


def test_bad_flag_value_is_reported(capsys):
    assert main(["--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
