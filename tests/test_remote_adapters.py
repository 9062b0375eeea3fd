"""Adapters from object storage through the node cache: a real S3-compatible endpoint (moto's
standalone server on 127.0.0.1, reached through s3fs), a plain HTTP server, and a TCP proxy that
stands in for a distant store (latency, a byte rate, and going away)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_lora_engine, write_peft_adapter, write_tiny_gguf
from remote_store import HttpServer, S3Server, ThrottledProxy

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.lora.node_cache import AdapterNotFound, NodeCache, SourceUnavailable
from plora_jax.policies import Decision, Policy
from plora_jax.policies.base import PoolView

CFG = tiny()
IDS = [5, 17, 3, 40, 22, 9, 11]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store(s3, tmp_path_factory):
    """Three adapters in the bucket under t/ (a1, a2, a3) and their local folders."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {n: write_peft_adapter(root / n, CFG, 8, seed=i) for i, n in enumerate(("a1", "a2", "a3"))}
    uris = {n: s3.upload(f, f"t/{n}") for n, f in folders.items()}
    return folders, uris


def node_cache(s3, path: Path, url: str | None = None, budget: int = 1 << 30) -> NodeCache:
    return NodeCache(path, budget, json.loads(s3.options(url)))


def test_an_adapter_only_in_the_bucket_serves_as_its_folder_does_and_is_fetched_once(s3, store, tmp_path):
    """Same greedy text and logits as the same adapter from a local folder; later loads (no host
    cache: every load reads again) come from the node cache; a restarted engine on the same node
    cache fetches nothing."""
    folders, uris = store
    options = dict(node_cache_dir=str(tmp_path / "node"), adapter_source_options=s3.options(), host_cache_mb=0)
    engine = tiny_lora_engine(CFG, **options)
    try:
        engine.add_adapter("local", folders["a1"])
        listing = engine.add_adapter("remote", uris["a1"])
        assert listing["path"] == uris["a1"]
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        local, remote = engine.generate([IDS, IDS], greedy, adapters=["local", "remote"])
        assert remote.token_ids == local.token_ids and len(local.token_ids) == 6
        np.testing.assert_array_equal(engine.logits(IDS, "remote"), engine.logits(IDS, "local"))
        stats = engine.stats()
        sizes = sum(f.stat().st_size for f in folders["a1"].iterdir())
        assert stats["node_cache_misses"] == 1 and stats["bytes_remote_to_disk"] == sizes
        engine.reset_adapters()  # off the device; with no host cache the next load reads again
        engine.generate([IDS], greedy, adapters=["remote"])
        stats = engine.stats()
        assert stats["node_cache_misses"] == 1 and stats["node_cache_hits"] >= 2
    finally:
        engine.close()
    restarted = tiny_lora_engine(CFG, **options)
    try:
        restarted.add_adapter("remote", uris["a1"])
        stats = restarted.stats()
        assert stats["node_cache_misses"] == 0 and stats["node_cache_hits"] == 1
        assert stats["bytes_remote_to_disk"] == 0
    finally:
        restarted.close()


class FetchAhead(Policy):
    """Fetches `names` into the node cache at every decision; loads on demand otherwise."""

    name = "fetch_ahead"

    def __init__(self, *names: str):
        super().__init__(interval_s=3600.0)
        self.names = list(names)

    def decide(self, view: PoolView) -> Decision:
        return Decision(disk=[n for n in self.names if n not in view.on_disk])


def test_a_policy_fetches_an_adapter_into_the_node_cache_ahead_of_its_request(s3, store, tmp_path):
    """With the node cache emptied, the adapter is in the store tier; a decision's disk prefetch
    fetches it on the store link (nothing onto the host or the device), so its request finds it
    on the node's disk: a cold start from the disk tier, counted as a disk prefetch hit."""
    _, uris = store
    options = dict(node_cache_dir=str(tmp_path / "node"), adapter_source_options=s3.options(), host_cache_mb=0)
    engine = tiny_lora_engine(CFG, **options)
    try:
        engine.add_adapter("remote", uris["a2"])
        engine.reset_adapters(node_cache=True)
        assert engine.adapters()[0]["residency"] == "store" and engine.stats()["node_cache_misses"] == 1
        engine.set_policy(FetchAhead("remote"))
        engine.core.step()  # the first step after adopting a policy decides: the fetch starts
        engine.core.lora.drain()  # wait for it (a transfer thread's job, handed back here)
        stats = engine.stats()
        assert stats["disk_prefetch_issued"] == 1 and stats["node_cache_misses"] == 2  # registration's, then this
        assert engine.adapters()[0]["residency"] == "disk" and stats["adapters_on_host"] == 0
        assert stats["link_remote_to_disk_transfers"] == 2 and stats["link_remote_to_disk_bytes_per_s"] > 0
        out = engine.generate([IDS], SamplingParams(max_tokens=2, temperature=0.0), adapters=["remote"])[0]
        assert out.metrics.cold_start and out.metrics.adapter_tier == "disk"
        stats = engine.stats()
        assert stats["disk_prefetch_hits"] == 1 and stats["disk_prefetch_recall"] == 1.0
        assert stats["node_cache_misses"] == 2 and stats["disk_hits"] == 1 and stats["store_misses"] == 0
    finally:
        engine.close()


def test_an_http_source_serves_the_same_adapter(store, tmp_path):
    folders, _ = store
    server = HttpServer(folders["a2"].parent)
    engine = tiny_lora_engine(CFG, node_cache_dir=str(tmp_path / "node"))
    try:
        engine.add_adapter("local", folders["a2"])
        engine.add_adapter("web", f"{server.url}/a2")
        np.testing.assert_array_equal(engine.logits(IDS, "web"), engine.logits(IDS, "local"))
        assert engine.stats()["node_cache_misses"] == 1
    finally:
        engine.close()
        server.stop()


def test_a_corrupted_cached_file_is_detected_and_fetched_again(s3, store, tmp_path):
    _, uris = store
    cache = node_cache(s3, tmp_path / "node")
    with cache.open(uris["a1"]) as folder:
        good = (folder / "adapter_model.safetensors").read_bytes()
    weights = folder / "adapter_model.safetensors"
    corrupted = bytearray(good)
    corrupted[-1] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(corrupted))
    with cache.open(uris["a1"]) as again:
        assert (again / "adapter_model.safetensors").read_bytes() == good
    assert cache.counters["node_cache_corrupt"] == 1 and cache.counters["node_cache_misses"] == 2
    (again / "adapter_model.safetensors").unlink()  # a file gone: fetched again too
    with cache.open(uris["a1"]) as third:
        assert (third / "adapter_model.safetensors").read_bytes() == good
    assert cache.counters["node_cache_misses"] == 3


def test_eviction_keeps_the_budget_and_never_removes_an_adapter_being_read(s3, store, tmp_path):
    folders, uris = store
    size = sum(f.stat().st_size for f in folders["a1"].iterdir())
    cache = node_cache(s3, tmp_path / "node", budget=int(size * 1.5))  # one adapter fits, not two
    with cache.open(uris["a1"]) as held:
        with cache.open(uris["a2"]):
            pass
        assert held.exists() and cache.counters["node_cache_evictions"] == 0  # a1 is being read
    assert cache.used_bytes() > cache.budget  # over, until the next fetch can evict
    with cache.open(uris["a3"]):
        pass
    assert cache.counters["node_cache_evictions"] == 2 and cache.used_bytes() <= cache.budget
    assert not held.exists()


def test_a_name_without_an_object_is_not_found_and_a_store_gone_is_unavailable(s3, store, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # a store that is gone fails at once, not after backoff
    _, uris = store
    proxy = ThrottledProxy(s3.port)
    cache = node_cache(s3, tmp_path / "node", proxy.url)
    try:
        with pytest.raises(AdapterNotFound, match="no adapter at"):
            cache.version("s3://loras/t/missing")
        with cache.open(uris["a1"]):
            pass
        proxy.down = True
        with pytest.raises(SourceUnavailable, match="cannot be read"):
            cache.version(uris["a2"])
        key, _ = node_cache(s3, tmp_path / "other").version(uris["a1"])  # straight to the store
        with cache.open(uris["a1"], key) as folder:  # a registered version: no store needed
            assert (folder / "adapter_config.json").is_file()
    finally:
        proxy.stop()


def test_a_demand_fetch_goes_ahead_of_prefetches_already_on_the_link(s3, tmp_path, monkeypatch):
    """Two prefetches (background fetches) start on a slow shared link; a demand fetch of an
    adapter as large, started once they are moving bytes, finishes first: the prefetches wait
    between chunks while it runs, then finish. (Without the link's turns it would finish last.)"""
    import threading

    from plora_jax.lora import node_cache as node_cache_module

    big = {n: write_peft_adapter(tmp_path / "src" / n, CFG, 64, seed=7 + i) for i, n in enumerate(("p1", "p2"))}
    same = write_peft_adapter(tmp_path / "src" / "d", CFG, 64, seed=9)  # as large: it wins only by its turn
    uris = {n: s3.upload(f, f"link/{n}") for n, f in (*big.items(), ("d", same))}
    weights = (big["p1"] / "adapter_model.safetensors").stat().st_size
    monkeypatch.setattr(node_cache_module, "CHUNK_BYTES", 4096)  # many chunks: many turns on the link
    proxy = ThrottledProxy(s3.port, latency_s=0.01, bytes_per_s=weights / 1.5)  # a prefetch alone: ~1.5 s
    cache = node_cache(s3, tmp_path / "node", proxy.url)
    finished: list[str] = []

    def fetch(name: str, demand: bool) -> None:
        with cache.open(uris[name], demand=demand):
            finished.append(name)

    try:
        prefetches = [threading.Thread(target=fetch, args=(n, False)) for n in big]
        for t in prefetches:
            t.start()
        start = proxy.bytes_down
        while proxy.bytes_down < start + 3 * 4096:  # both are moving bytes (a condition, not a sleep)
            threading.Event().wait(0.01)
        fetch("d", demand=True)
        assert finished == ["d"], finished  # ahead of both prefetches already on the link
        for t in prefetches:
            t.join(60)
        assert sorted(finished[1:]) == ["p1", "p2"] and cache.link.yielded > 0
    finally:
        proxy.stop()


_FETCH = textwrap.dedent(
    """
    import json, sys
    from plora_jax.config import tiny
    from plora_jax.lora.node_cache import NodeCache
    from plora_jax.lora.peft import parse_target_modules, read_adapter

    root, uri, options = sys.argv[1:]
    sys.stdin.readline()  # the test's "go", once both processes are up
    cache = NodeCache(root, 1 << 30, json.loads(options))
    with cache.open(uri) as folder:
        info, adapter = read_adapter("a", folder, tiny(), 64, parse_target_modules("all"))
    print(json.dumps({"misses": cache.counters["node_cache_misses"], "rank": adapter.rank}))
    """
)


def test_two_processes_asking_at_once_download_once_and_both_read_it(s3, store, tmp_path):
    """Through a slow link (0.2 s first byte, 100 kB/s), so the fetches overlap; whatever the
    interleaving, the lock lets exactly one of them download."""
    _, uris = store
    proxy = ThrottledProxy(s3.port, latency_s=0.2, bytes_per_s=100e3)
    args = [str(tmp_path / "node"), uris["a3"], s3.options(proxy.url)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", _FETCH, *args]
    procs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    try:
        for p in procs:  # "go" to both, then wait for both
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        proxy.stop()
    assert sum(r["misses"] for r in results) == 1
    assert [r["rank"] for r in results] == [8, 8]


def test_unknown_names_resolve_from_the_template_over_http(s3, store, tmp_path, monkeypatch):
    """--adapter-source: a name in the bucket is fetched on its first request (concurrent
    requests share one fetch), a name without an object is 404 naming the model, and once the
    store is gone new names are 503 while registered ones keep serving. load_lora_adapter takes
    URIs inside the configured prefix only."""
    import s3fs
    from asgi_helpers import call_app
    from fastapi.testclient import TestClient

    from serving.app import ServerState, build_app
    from serving.sources import AdapterSources

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # a store that is gone fails at once
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, config=CFG)  # the adapters' model, with a tokenizer
    proxy = ThrottledProxy(s3.port, latency_s=0.05)
    engine = Engine.from_pretrained(
        str(gguf), warmup=False, max_model_len=128, num_kv_blocks=32, cache_dir=str(tmp_path / "c"),
        node_cache_dir=str(tmp_path / "node"), adapter_source_options=s3.options(proxy.url),
    )  # fmt: skip
    sources = AdapterSources.of([], "s3://loras/t/{name}")
    app = build_app(ServerState(engine, "tiny", sources))

    def body(model: str) -> dict:
        return {"model": model, "prompt": IDS, "max_tokens": 2, "temperature": 0}

    try:

        async def together():
            return await asyncio.gather(call_app(app, body("a1")), call_app(app, body("a1")))

        for sent in asyncio.run(together()):
            assert sent[0]["status"] == 200, sent
        assert engine.stats()["node_cache_misses"] == 1  # one fetch for both
        with TestClient(app) as client:
            r = client.post("/v1/completions", json=body("missing"))
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            assert client.post("/v1/completions", json=body("../t/a1")).status_code == 404
            for path, status in (("s3://loras/t/a3", 200), ("s3://loras/u/a3", 400), ("s3://loras/t/../u", 400)):
                r = client.post("/v1/load_lora_adapter", json={"lora_name": f"x{status}", "lora_path": path})
                assert r.status_code == status, (path, r.text)
            models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert models["a1"]["root"] == "a1" and models["x200"]["root"] == "a3"
            assert "plora_node_cache_misses 2.0" in client.get("/metrics").text  # a1 and a3
            proxy.down = True
            r = client.post("/v1/completions", json=body("a2"))
            assert r.status_code == 503 and "a2" in r.json()["error"]["message"], r.text
            assert client.post("/v1/completions", json=body("a1")).status_code == 200
    finally:
        engine.close()
        proxy.stop()
