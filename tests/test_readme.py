"""The README's and the docs' Python examples run as written and print what they claim; every
relative link in them points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ADAPTERS_DOC = ROOT / "docs" / "adapters.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [link for link in links if "://" not in link]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_readme_links_every_docs_page():
    text = README.read_text()
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_python_example_runs(capsys, smollm_path):
    block = python_blocks(README)[1]
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
    assert 'python -m pytest -q -m "not slow"' in text  # the quick loop, beside the full command


def test_readme_adapter_example_runs(tmp_path, monkeypatch, smollm_path):
    """The adapter example, with two PEFT folders where it expects them."""
    from plora_jax.config import smollm2_135m
    from plora_jax.lora.peft import save_random_adapter

    block = python_blocks(ADAPTERS_DOC)[0]
    save_random_adapter(tmp_path / "adapters/sql-lora", smollm2_135m(), 16, ("q_proj", "v_proj"))
    save_random_adapter(tmp_path / "adapters/chat-lora", smollm2_135m(), 8, ("o_proj",), seed=1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(ADAPTERS_DOC), "exec"), namespace)
    assert [len(o.token_ids) for o in namespace["outs"]] and len(namespace["outs"]) == 3
    names = [a["name"] for a in namespace["engine"].adapters()]
    assert names == ["chat"]
    namespace["engine"].close()


def test_readme_tiers_example_runs(tmp_path, monkeypatch, capsys, smollm_path):
    """The tiers example, with two PEFT folders (and one broken) under adapters/."""
    from plora_jax.config import smollm2_135m
    from plora_jax.lora.peft import save_random_adapter

    block = next(b for b in python_blocks(ADAPTERS_DOC) if "found = " in b)
    save_random_adapter(tmp_path / "adapters/sql-lora", smollm2_135m(), 16, ("q_proj", "v_proj"))
    save_random_adapter(tmp_path / "adapters/chat-lora", smollm2_135m(), 8, ("o_proj",), seed=1)
    (tmp_path / "adapters/broken").mkdir()
    (tmp_path / "adapters/broken/adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(ADAPTERS_DOC), "exec"), namespace)
    try:
        assert namespace["found"]["added"] == ["chat-lora", "sql-lora"]
        assert "peft_type" in namespace["found"]["errors"]["broken"]
        assert "lookahead [('chat-lora', 'disk'), ('sql-lora', 'disk')]" in capsys.readouterr().out
    finally:
        namespace["engine"].close()
