"""The README's Python example runs as written and prints what it claims."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys, smollm_path):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert "Paris" in capsys.readouterr().out
    assert namespace["logits"].shape == (len(namespace["ids"]), 49152)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && python -m pytest -q' in text
    assert 'pip install -e ".[test]" && python -m pytest -q' in ci
    assert 'pip install -e ".[serve]" && python -m serving.main --model llama' in text


def test_readme_adapter_example_runs(tmp_path, monkeypatch, smollm_path):
    """The adapter example, with two PEFT folders where it expects them."""
    from plora_jax.adapters import save_random_adapter
    from plora_jax.config import smollm2_135m

    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[2]
    save_random_adapter(tmp_path / "adapters/sql-lora", smollm2_135m(), 16, ("q_proj", "v_proj"))
    save_random_adapter(tmp_path / "adapters/chat-lora", smollm2_135m(), 8, ("o_proj",), seed=1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert [len(o.token_ids) for o in namespace["outs"]] and len(namespace["outs"]) == 3
    names = [a["name"] for a in namespace["engine"].adapters()]
    assert names == ["chat"]
    namespace["engine"].close()


def test_readme_tiers_example_runs(tmp_path, monkeypatch, capsys, smollm_path):
    """The tiers example, with two PEFT folders (and one broken) under adapters/."""
    from plora_jax.adapters import save_random_adapter
    from plora_jax.config import smollm2_135m

    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[3]
    save_random_adapter(tmp_path / "adapters/sql-lora", smollm2_135m(), 16, ("q_proj", "v_proj"))
    save_random_adapter(tmp_path / "adapters/chat-lora", smollm2_135m(), 8, ("o_proj",), seed=1)
    (tmp_path / "adapters/broken").mkdir()
    (tmp_path / "adapters/broken/adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    try:
        assert namespace["found"]["added"] == ["chat-lora", "sql-lora"]
        assert "peft_type" in namespace["found"]["errors"]["broken"]
        assert "lookahead [('chat-lora', 'disk'), ('sql-lora', 'disk')]" in capsys.readouterr().out
    finally:
        namespace["engine"].close()
