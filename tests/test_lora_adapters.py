"""Adapter validation, the host page allocator, and churn through the device pool.

The model is not the point here, so a tiny random Llama is used; the reference for an adapter's
output is the base model with the adapter merged into its weights (W + scaling * B A), run
through the plain model forward, independent of pools, pages and kernels.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_peft_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from plora_jax import Engine, SamplingParams
from plora_jax.config import tiny
from plora_jax.engine.state import KVCache, PrefillMetadata
from plora_jax.lora.page_allocator import PagePool
from plora_jax.lora.peft import AdapterError, load_adapter
from plora_jax.models.llama import Llama, init_params

CFG = tiny()
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11, 64, 8, 1, 33]


# --- validation ---------------------------------------------------------------------------
def test_peft_scaling_and_patterns(tmp_path):
    path = write_peft_adapter(
        tmp_path / "a",
        CFG,
        rank=16,
        targets=("q_proj", "down_proj"),
        alpha=32,
        use_rslora=True,
        alpha_pattern={"down_proj": 8},
    )
    adapter = load_adapter("a", path, CFG, max_rank=64)
    raw = load_file(str(path / "adapter_model.safetensors"))
    a, b = adapter.weights[(1, "q_proj")]
    np.testing.assert_array_equal(a, raw["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"])
    ref_b = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_allclose(b, ref_b * 32 / math.sqrt(16), rtol=1e-6)  # rsLoRA: alpha / sqrt(r)
    _, b_down = adapter.weights[(0, "down_proj")]
    ref_down = raw["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    np.testing.assert_allclose(b_down, ref_down * 8 / math.sqrt(16), rtol=1e-6)  # alpha_pattern
    assert adapter.rank == 16 and adapter.target_modules == ["q_proj", "down_proj"]


def _corrupt(tmp_path, case):
    path = write_peft_adapter(tmp_path / case, CFG, rank=8)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    weights = path / "adapter_model.safetensors"
    if case == "missing_config":
        config_file.unlink()
    elif case == "missing_weights":
        weights.unlink()
    elif case == "pickled_bin":
        weights.rename(path / "adapter_model.bin")
    elif case == "dora":
        config_file.write_text(json.dumps({**config, "use_dora": True}))
    elif case == "bad_json":
        config_file.write_text("{not json")
    elif case == "unsupported_target":
        config_file.write_text(json.dumps({**config, "target_modules": ["q_proj", "embed_tokens"]}))
    elif case == "rank_too_high":
        write_peft_adapter(path, CFG, rank=160)
    elif case == "wrong_shape":
        write_peft_adapter(path, tiny(hidden_size=32, head_dim=8), rank=8)
    elif case == "nan":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = np.nan
        save_file(tensors, str(weights))
    return path


BAD = {
    "missing_config": "adapter_config.json",
    "missing_weights": "adapter_model.safetensors",
    "pickled_bin": "adapter_model.bin",
    "dora": "use_dora",
    "bad_json": "not valid JSON",
    "unsupported_target": "target_modules",
    "rank_too_high": "max_lora_rank",
    "wrong_shape": "do not fit the base model",
    "nan": "NaN",
}


@pytest.fixture(scope="module")
def small_engine():
    params = init_params(CFG, jnp.float32, seed=0, scale=0.2)
    engine = Engine.from_params(
        CFG,
        params,
        warmup=True,
        max_model_len=64,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        num_kv_blocks=64,
        max_loras=12,
        max_lora_rank=128,
        page_rows=8,
        lora_pool_pages=86,
    )
    engine.base_params = params
    yield engine
    engine.close()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_refused_and_engine_keeps_serving(small_engine, tmp_path, case):
    path = _corrupt(tmp_path, case)
    with pytest.raises(AdapterError, match=BAD[case]) as err:
        small_engine.add_adapter(f"bad-{case}", path)
    # The folder by its own name: no absolute path (a server shows these messages to clients).
    assert isinstance(err.value, ValueError) and path.name in str(err.value) and str(path.parent) not in str(err.value)
    assert all(a["name"] != f"bad-{case}" for a in small_engine.adapters())
    out = small_engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))[0]
    assert len(out.token_ids) == 2


def test_unknown_adapter_and_duplicate_name(small_engine, tmp_path):
    with pytest.raises(ValueError, match="adapters\\[0\\]"):
        small_engine.generate([PROMPT], adapters=["nope"])
    path = write_peft_adapter(tmp_path / "dup", CFG, rank=8)
    small_engine.add_adapter("dup", path)
    with pytest.raises(AdapterError, match="already registered"):
        small_engine.add_adapter("dup", path)
    small_engine.remove_adapter("dup")


def test_target_modules_outside_the_pool_are_refused(tmp_path):
    path = write_peft_adapter(tmp_path / "mlp", CFG, rank=8, targets=("q_proj", "up_proj"))
    with pytest.raises(AdapterError, match="lora_target_modules"):
        load_adapter("mlp", path, CFG, max_rank=64, modules=("q_proj", "v_proj"))


# --- host allocator -----------------------------------------------------------------------
def test_page_pool_lru_pins_and_no_fragmentation():
    pool = PagePool(num_pages=11, max_slots=5, max_pages=4)  # 10 usable pages, 4 slots
    assert pool.allocate("a", 4, 1)[1] == [] and pool.allocate("b", 3, 1) and pool.allocate("c", 3, 1)
    pool.pin("a")
    pool.get("b")
    # Needs 2 pages: evicts the least recently used unpinned adapter ("b", since "a" is pinned).
    res, evicted = pool.allocate("d", 2, 1)
    assert evicted == ["b"] and len(res.pages) == 2
    pool.check()
    # Pages freed by different adapters serve one larger adapter (no contiguity needed).
    res, evicted = pool.allocate("e", 4, 1)
    assert evicted == ["c"] and len(res.pages) == 4
    pool.check()
    # Nothing unpinned left to make room: the caller waits.
    pool.pin("d")
    pool.pin("e")
    assert pool.allocate("f", 3, 1) is None
    pool.unpin("a")
    assert pool.allocate("f", 3, 1)[1] == ["a"]
    pool.check()
    with pytest.raises(ValueError, match="in use"):
        pool.evict("d")


def test_contiguous_layout_reserves_max_rank():
    pool = PagePool(num_pages=17, max_slots=9, max_pages=4, layout="contiguous")  # 4 regions of 4 pages
    for i in range(4):
        res, _ = pool.allocate(f"a{i}", 1, 1)
        assert res.pages == list(range(1 + (res.slot - 1) * 4, 1 + res.slot * 4))  # the whole region
    assert pool.pages_used == 16
    res, evicted = pool.allocate("big", 4, 1)
    assert evicted == ["a0"]
    pool.check()


# --- churn through the device pool ---------------------------------------------------------
def _forward(params, ids):
    """Logits of `ids` through the plain model (no adapter pool): the merged-weights reference."""
    n = len(ids)
    blocks = 1 + n // 16
    kv = KVCache.zeros(CFG, blocks + 1, 16, jnp.float32)
    positions = np.arange(n, dtype=np.int32)
    meta = PrefillMetadata(
        positions=positions,
        slot_mapping=positions + 16,  # blocks 1, 2, ... in order
        segment_ids=np.zeros((n,), np.int32),
        block_tables=np.arange(1, blocks + 1, dtype=np.int32)[None],
        seq_starts=np.zeros((1,), np.int32),
        logits_indices=np.array([n - 1], np.int32),
    )
    logits, _ = Llama(CFG).apply({"params": params}, np.asarray(ids, np.int32), kv, meta)
    return np.asarray(logits)


def _merged(base_params, adapter):
    params = jax.tree_util.tree_map(np.array, base_params)
    for (layer, module), (a, b) in adapter.weights.items():
        parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        params[f"layers_{layer}"][parent][module]["weight"] += b @ a  # [out, in]
    return params


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_churn_loads_evicts_reloads_without_compiles_or_leaks(small_engine, tmp_path):
    rng = np.random.default_rng(0)
    names, refs = [], {}
    for i in range(40):
        rank = int(rng.integers(4, 129))
        targets = tuple(
            sorted(
                rng.choice(
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    size=int(rng.integers(1, 8)),
                    replace=False,
                )
            )
        )
        path = write_peft_adapter(tmp_path / f"a{i}", CFG, rank=rank, targets=targets, seed=i, scale=0.05)
        small_engine.add_adapter(f"churn{i}", path)
        names.append(f"churn{i}")
        refs[f"churn{i}"] = _forward(_merged(small_engine.base_params, load_adapter("x", path, CFG, 128)), PROMPT)
    base_ref = _forward(small_engine.base_params, PROMPT)
    lora = small_engine.core.lora
    small_engine.logits(PROMPT, adapter=names[0])  # compiles the logits shape (not part of serving warm-up)
    compiles = small_engine.stats()["compiles_total"]
    loads0 = small_engine.stats()["adapter_loads"]
    for cycle in range(300):
        name = names[int(rng.integers(len(names)))]
        got = small_engine.logits(PROMPT, adapter=name)
        np.testing.assert_allclose(got, refs[name], atol=1e-4, rtol=1e-4, err_msg=f"cycle {cycle} {name}")
        assert np.abs(got - base_ref).max() > 1e-3  # the adapter is really applied
    stats = small_engine.stats()
    assert stats["compiles_total"] == compiles, "loading/evicting adapters recompiled"
    assert stats["adapter_loads"] - loads0 >= 200 and stats["adapter_evictions"] >= 190
    assert stats["adapters_on_device"] <= 12
    small_engine.core.call(lora.pages.check)
    assert all(r.pins == 0 for r in lora.pages.resident.values())
    assert stats["adapter_pages_used"] == sum(len(r.pages) for r in lora.pages.resident.values())
    for name in names:
        small_engine.remove_adapter(name)
    assert small_engine.stats()["adapter_pages_used"] == 0
    small_engine.core.call(lora.pages.check)


@pytest.mark.slow  # compiles a warm-up plan or many executables
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_requests_wait_for_a_full_pool_and_mix_in_one_batch(tmp_path, layout):
    """A pool that fits two rank-64 adapters, four running rows: the others wait, none fail,
    and outputs equal each request run alone."""
    params = init_params(CFG, jnp.float32, seed=1, scale=0.2)
    engine = Engine.from_params(
        CFG,
        params,
        warmup=False,
        max_model_len=64,
        max_num_seqs=4,
        num_kv_blocks=64,
        lora_pool_pages=17,
        page_rows=8,
        max_lora_rank=64,
        layout=layout,
    )
    try:
        for i in range(4):
            engine.add_adapter(
                f"w{i}", write_peft_adapter(tmp_path / f"w{i}", CFG, rank=64, seed=i, targets=("q_proj", "up_proj"))
            )
        adapters = [None, "w0", "w1", "w2", "w3", None, "w0"]
        prompts = [PROMPT[: 4 + i] for i in range(len(adapters))]
        params_s = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        together = engine.generate(prompts, params_s, adapters=adapters)
        alone = [engine.generate([p], params_s, adapters=[a])[0] for p, a in zip(prompts, adapters, strict=True)]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        assert len({tuple(o.token_ids) for o in together[1:5]}) > 1  # different adapters, different outputs
        assert max(o.metrics.adapter_wait_s for o in together) > 0
        assert engine.stats()["adapter_evictions"] >= 2
    finally:
        engine.close()


# --- allocator invariants under random operations ------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["load", "pin", "unpin", "evict"]), st.integers(0, 11), st.integers(1, 8)),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, layout=st.sampled_from(["paged", "contiguous"]))
def test_page_pool_invariants_under_random_operations(ops, layout):
    """Random loads (some failing for lack of room), pins, unpins and evictions: page 0 is never
    handed out, no page or slot is owned twice, pinned adapters are never evicted, and free +
    used = total."""
    pool = PagePool(num_pages=25, max_slots=7, max_pages=8, layout=layout)
    pins: dict[str, int] = {}
    for op, key, size in ops:
        name = f"a{key}"
        if op == "load" and pool.get(name) is None:
            pinned_before = {n for n, c in pins.items() if c}
            placed = pool.allocate(name, size, size)
            if placed is not None:
                _, evicted = placed
                assert not set(evicted) & pinned_before, "a pinned adapter was evicted"
                for gone in evicted:
                    pins.pop(gone, None)
        elif op == "pin" and pool.get(name) is not None:
            pool.pin(name)
            pins[name] = pins.get(name, 0) + 1
        elif op == "unpin" and pins.get(name):
            pool.unpin(name)
            pins[name] -= 1
        elif op == "evict" and pool.get(name) is not None:
            if pins.get(name):
                with pytest.raises(ValueError, match="in use"):
                    pool.evict(name)
            else:
                pool.evict(name)
        pool.check()
        for n, count in pins.items():
            if count:
                assert pool.get(n) is not None and pool.get(n).pins == count
