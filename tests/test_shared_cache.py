"""The compile cache every node shares (`compile_cache`): a fresh node (empty local caches, here
another folder on this machine) pulls the executables, the converted parameters and the CPU
kernel, compiles nothing and serves (the same path a restart takes: pulled files are loaded
from the local caches); an entry made for another configuration, or damaged, is ignored with a
warning; an object store works as a folder does."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_gguf
from remote_store import S3Server

from plora_jax.config import tiny
from plora_jax.shared_cache import SharedCache

KEY = b"0123456789abcdef0123456789abcdef"  # the nodes' shared secret (compile_cache_key)

# A fresh process: a LoRA engine from a GGUF (warm-up on), one request; the plan's counters and
# every backend compile the process ran (jax.monitoring, all threads).
_START = """
import json, sys, jax
compiles = []
COMPILE = "/jax/core/compile/backend_compile_duration"
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event) if event == COMPILE else None
)
from plora_jax import Engine, SamplingParams
gguf, cache, shared, key = sys.argv[1:]
engine = Engine.from_pretrained(
    gguf, cache_dir=cache, compile_cache=shared, compile_cache_key=key, max_loras=2, lora_pool_pages=20,
    policy="lru", max_model_len=64, num_kv_blocks=24, block_size=8, max_num_seqs=2, max_num_batched_tokens=16,
    max_prefill_seqs=1,
)
engine.runner.plan.complete.wait()
out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0))[0]
stats = engine.stats()
engine.close()
print(json.dumps({"compiled": stats["compiled"], "loaded": stats["loaded"], "pulled": stats["pulled"],
                  "executables": stats["executables"], "process_compiles": len(compiles), "tokens": out.token_ids}))
"""


def start(gguf: Path, cache: Path, shared: Path | str, key: Path | str) -> tuple[dict, str]:
    args = [str(gguf), str(cache), str(shared), str(key)]
    out = subprocess.run([sys.executable, "-c", _START, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.slow  # two fresh processes, one compiling the whole plan
def test_a_fresh_node_with_a_warm_shared_cache_compiles_nothing(tmp_path):
    """The second process starts on another node's caches (empty) and loads everything through
    its own local caches, so this is also the check that a restart compiles nothing."""
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, config=tiny())
    shared, key = tmp_path / "shared", tmp_path / "cache.key"
    key.write_text(KEY.decode())
    first, _ = start(gguf, tmp_path / "node1", shared, key)
    assert first["compiled"] == first["executables"] > 0 and first["pulled"] == 0
    for kind in ("executables", "params", "kernels"):
        assert len(list((shared / kind).glob("*/manifest.json"))) == 1, kind

    copy = tmp_path / "node2-model" / "tiny.gguf"  # another node's copy of the model: another inode
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    fresh, _ = start(copy, tmp_path / "node2", shared, key)  # another node: its own caches are empty
    assert fresh["pulled"] == fresh["executables"] and fresh["loaded"] == fresh["executables"]
    assert fresh["compiled"] == 0 and fresh["process_compiles"] == 0, "a fresh node compiled something"
    assert fresh["tokens"] == first["tokens"]
    assert list((tmp_path / "node2" / "params").glob("*/COMPLETE")) and list((tmp_path / "node2").glob("kernels/*.so"))
    restart, _ = start(gguf, tmp_path / "node1", "", "")  # a restart on the first node: its own cache only
    assert restart["compiled"] == 0 and restart["pulled"] == 0 and restart["process_compiles"] == 0


def test_a_shared_entry_for_another_environment_is_ignored_with_a_warning(tmp_path, caplog):
    """The executable cache of a fresh node pulls only an entry whose fingerprint is its own."""
    from plora_jax.engine.compile_plan import ExecutableCache

    fingerprint = {"jax": "1", "model": "m"}
    shared = SharedCache(str(tmp_path / "shared"), key=KEY)
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "decode-1.xexe").write_bytes(b"payload")
    key = ExecutableCache(tmp_path / "node0", fingerprint).key
    assert shared.publish("executables", key, {**fingerprint, "jax": "0.0.0"}, tmp_path / "built", ["decode-1.xexe"])
    with caplog.at_level(logging.WARNING):
        cache = ExecutableCache(tmp_path / "node1", fingerprint, shared)
    assert cache.pulled == 0 and not list(cache.dir.glob("*.xexe"))
    assert "made for another configuration or environment" in caplog.text


def test_code_is_pulled_only_from_entries_signed_with_our_key(tmp_path, caplog):
    """Executables and kernels run as code: without a key they are never pulled, and an entry
    written by someone without our key (unsigned, or signed with another) is ignored."""
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "decode-1.xexe").write_bytes(b"planted")
    fingerprint, files = {"jax": "1"}, ["decode-1.xexe"]
    SharedCache(str(tmp_path / "unsigned")).publish("executables", "k", fingerprint, tmp_path / "built", files)
    other = SharedCache(str(tmp_path / "other"), key=b"another key, 16+ bytes")
    other.publish("executables", "k", fingerprint, tmp_path / "built", files)
    with caplog.at_level(logging.WARNING):
        assert SharedCache(str(tmp_path / "unsigned")).pull("executables", "k", fingerprint, tmp_path / "a") is None
        assert "without compile_cache_key" in caplog.text
        for store in ("unsigned", "other"):
            assert (
                SharedCache(str(tmp_path / store), key=KEY).pull("executables", "k", fingerprint, tmp_path / "b")
                is None
            )
        assert "not signed with our key" in caplog.text
    ours = SharedCache(str(tmp_path / "ours"), key=KEY)
    ours.publish("executables", "k", fingerprint, tmp_path / "built", files)
    assert ours.pull("executables", "k", fingerprint, tmp_path / "c") == files
    # A manifest rewritten by someone without the key (here: its writer id pointed elsewhere).
    manifest = tmp_path / "ours" / "executables" / "k" / "manifest.json"
    forged = json.loads(manifest.read_text()) | {"writer": "../../elsewhere"}
    manifest.write_text(json.dumps(forged))
    assert ours.pull("executables", "k", fingerprint, tmp_path / "d") is None


def test_entries_are_verified_and_published_once_in_a_folder_or_a_bucket(tmp_path, caplog):
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    (files / "a.bin").write_bytes(b"x" * 1000)
    (files / "sub" / "b.bin").write_bytes(b"y" * 10)
    names = ["a.bin", "sub/b.bin"]
    s3 = S3Server("shared")
    try:
        for uri, options in ((str(tmp_path / "shared"), None), ("s3://shared/cache", json.loads(s3.options()))):
            cache = SharedCache(uri, options, KEY)
            assert cache.pull("executables", "k1", {"jax": "1"}, tmp_path / "miss") is None  # nothing there yet
            assert cache.publish("executables", "k1", {"jax": "1"}, files, names)
            assert not cache.publish("executables", "k1", {"jax": "1"}, files, names)  # once: the first stays
            got = cache.pull("executables", "k1", {"jax": "1"}, tmp_path / "got")
            assert got == names and (tmp_path / "got" / "sub" / "b.bin").read_bytes() == b"y" * 10
            with caplog.at_level(logging.WARNING):
                assert cache.pull("executables", "k1", {"jax": "2"}, tmp_path / "other") is None
            assert "another configuration" in caplog.text
            # A damaged file (the manifest's sha256 no longer matches): ignored, nothing left behind.
            manifest = json.loads(cache.fs.cat_file(f"{cache.root}/executables/k1/manifest.json"))
            cache.fs.pipe_file(f"{cache.root}/executables/k1/{manifest['writer']}/a.bin", b"z" * 1000)
            with caplog.at_level(logging.WARNING):
                assert cache.pull("executables", "k1", {"jax": "1"}, tmp_path / "bad") is None
            assert "is unusable" in caplog.text and not (tmp_path / "bad").exists()
            caplog.clear()
            for folder in ("got", "other"):
                for p in sorted((tmp_path / folder).rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
    finally:
        s3.stop()
