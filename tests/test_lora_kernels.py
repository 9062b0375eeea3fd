"""Paged LoRA kernels: the jnp reference on a hand-worked case, then every implementation (XLA
path, Pallas Triton and Pallas TPU in interpret mode) against the reference, and cross-platform
lowering for CUDA and TPU from this CPU (which catches tiling rules interpret mode accepts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from plora_jax.pallas.lora import gpu as lora_gpu
from plora_jax.pallas.lora import ops as lora_ops
from plora_jax.pallas.lora import reference as lora_ref
from plora_jax.pallas.lora import tpu as lora_tpu

RANKS = (8, 12, 16, 40, 64, 128)
IN, OUT = 64, 96


def numpy_reference(x, row_slot, adapters, base):
    """Third, independent reference: plain per-row matmuls on the unpaged weights."""
    out = base.astype(np.float64).copy()
    for b, slot in enumerate(row_slot):
        if slot in adapters:
            a, bw = adapters[slot]
            out[b] += x[b].astype(np.float64) @ a.T.astype(np.float64) @ bw.astype(np.float64)
    return out


def build_pool(page_rows, dtype, seed=0):
    """Adapters of every rank in RANKS on shuffled, non-contiguous pages; slot i+1 holds RANKS[i]."""
    rng = np.random.default_rng(seed)
    max_pages = 128 // page_rows
    num_pages = 1 + sum(-(-r // page_rows) for r in RANKS) + 7
    pool_a = np.zeros((num_pages, page_rows, IN), np.float32)
    pool_b = np.zeros((num_pages, page_rows, OUT), np.float32)
    table = np.zeros((len(RANKS) + 2, max_pages), np.int32)  # the last slot stays empty
    counts = np.zeros((len(RANKS) + 2,), np.int32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    adapters = {}
    for slot, rank in enumerate(RANKS, start=1):
        n = -(-rank // page_rows)
        pages = [int(free.pop()) for _ in range(n)]
        # Weights rounded through bf16 so f32 and bf16 runs see the same values.
        a = np.asarray(jnp.asarray(rng.uniform(-1, 1, (rank, IN)) / np.sqrt(IN), jnp.bfloat16), np.float32)
        b = np.asarray(jnp.asarray(rng.uniform(-1, 1, (rank, OUT)) / np.sqrt(rank), jnp.bfloat16), np.float32)
        a_rows = np.zeros((n * page_rows, IN), np.float32)
        b_rows = np.zeros((n * page_rows, OUT), np.float32)
        a_rows[:rank], b_rows[:rank] = a, b
        pool_a[pages] = a_rows.reshape(n, page_rows, IN)
        pool_b[pages] = b_rows.reshape(n, page_rows, OUT)
        table[slot, :n] = pages
        counts[slot] = n
        adapters[slot] = (a, b)
    return pool_a.astype(dtype), pool_b.astype(dtype), table, counts, adapters


CASES = {
    "mixed_with_base_rows": [0, 3, 1, 6, 0, 2, 3, 7],  # 7 is an empty slot: no pages
    "all_one_adapter": [4] * 8,
    "every_row_different": [1, 2, 3, 4, 5, 6, 0, 7],
}


def run(impl, x, base, row_slot, pool_a, pool_b, table, counts):
    if impl == "xla":
        return lora_ops.lora_delta_apply(x, base, row_slot, pool_a, pool_b, table, counts, "xla")
    if impl == "gpu":
        y = lora_gpu.shrink(x, row_slot, pool_a, table, counts, interpret=True)
        return lora_gpu.expand(y, base, row_slot, pool_b, table, counts, interpret=True)
    interpret = pltpu.InterpretParams() if impl == "tpu_strict" else True
    y = lora_tpu.shrink(x, row_slot, pool_a, table, counts, interpret=interpret)
    return lora_tpu.expand(y, base, row_slot, pool_b, table, counts, interpret=interpret)


def test_reference_hand_worked_case():
    # One adapter of rank 2 on pages [2] (page_rows 2), input width 2, output width 3.
    pool_a = np.zeros((3, 2, 2), np.float32)
    pool_b = np.zeros((3, 2, 3), np.float32)
    pool_a[2] = [[1, 0], [0, 2]]  # A^T rows: r0 = x0, r1 = 2 * x1
    pool_b[2] = [[1, 1, 0], [0, 0, 1]]  # out = (r0, r0, r1)
    table = np.array([[0], [2]], np.int32)
    counts = np.array([0, 1], np.int32)
    x = np.array([[[3.0, 5.0]], [[3.0, 5.0]]], np.float32)  # [batch 2, tokens 1, 2]
    base = np.full((2, 1, 3), 0.5, np.float32)
    row_slot = np.array([1, 0], np.int32)
    y = lora_ref.ref_shrink(x, row_slot, pool_a, table, counts)
    np.testing.assert_array_equal(np.asarray(y), [[[3.0, 10.0]], [[0.0, 0.0]]])
    out = lora_ref.ref_expand(y, base, row_slot, pool_b, table, counts)
    np.testing.assert_array_equal(np.asarray(out), [[[3.5, 3.5, 10.5]], [[0.5, 0.5, 0.5]]])


@pytest.mark.slow  # compiles a warm-up plan or many executables
@pytest.mark.parametrize("page_rows", [8, 16])
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu", "tpu_strict"])
def test_kernels_match_reference_f32(page_rows, tokens, impl):
    pool_a, pool_b, table, counts, adapters = build_pool(page_rows, np.float32)
    rng = np.random.default_rng(tokens)
    for case, slots in CASES.items():
        row_slot = np.asarray(slots, np.int32)
        x = rng.uniform(-1, 1, (len(slots), tokens, IN)).astype(np.float32)
        base = rng.uniform(-1, 1, (len(slots), tokens, OUT)).astype(np.float32)
        ref = lora_ref.ref_expand(
            lora_ref.ref_shrink(x, row_slot, pool_a, table, counts), base, row_slot, pool_b, table, counts
        )
        np.testing.assert_allclose(np.asarray(ref), numpy_reference(x, row_slot, adapters, base), atol=1e-5, rtol=1e-5)
        out = np.asarray(run(impl, x, base, row_slot, pool_a, pool_b, table, counts))
        assert np.isfinite(out).all(), case
        np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5, rtol=1e-5, err_msg=case)
        # Rows without an adapter are exactly the base output.
        no_lora = np.isin(row_slot, [0, 7])
        np.testing.assert_array_equal(out[no_lora], base[no_lora])


@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
def test_kernels_match_reference_bf16(impl):
    pool_a, pool_b, table, counts, _ = build_pool(16, jnp.bfloat16)
    rng = np.random.default_rng(1)
    row_slot = np.asarray(CASES["mixed_with_base_rows"], np.int32)
    x = jnp.asarray(rng.uniform(-1, 1, (8, 16, IN)), jnp.bfloat16)
    base = jnp.asarray(rng.uniform(-1, 1, (8, 16, OUT)), jnp.bfloat16)
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    ref = lora_ref.ref_expand(
        lora_ref.ref_shrink(f32(x), row_slot, f32(pool_a), table, counts),
        f32(base),
        row_slot,
        f32(pool_b),
        table,
        counts,
    )
    out = run(impl, x, base, row_slot, pool_a, pool_b, table, counts)
    assert out.dtype == jnp.bfloat16
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(ref), atol=1e-2 * scale, rtol=1e-2)


def interpret_kernels(impl: str, monkeypatch) -> None:
    """Run `impl`'s Pallas kernels (Triton or Mosaic) in interpret mode on this CPU."""
    import functools

    module = {"pallas_gpu": lora_gpu, "pallas_tpu": lora_tpu}.get(impl)
    if module is not None:
        monkeypatch.setattr(module, "shrink", functools.partial(module.shrink, interpret=True))
        monkeypatch.setattr(module, "expand", functools.partial(module.expand, interpret=True))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_model_entry_points_decode_rows_and_packed_groups(impl, monkeypatch):
    """`lora_rows` (decode) and `lora_groups` (packed prefill) as the model calls them:
    feature-major x [in, tokens], two projections sharing the input, tokens of several adapters
    in one packed row (and of none); each equals the reference per token."""
    interpret_kernels(impl, monkeypatch)
    pool_a, pool_b, table, counts, _ = build_pool(8, np.float32)
    pool_b2 = pool_b[..., ::-1].copy()  # a second projection: other B rows, same pages
    rng = np.random.default_rng(5)
    token_slot = np.array([3, 3, 3, 0, 0, 6, 6, 1, 3, 0], np.int32)  # segments of adapters 3, none, 6, 1, 3
    x = rng.uniform(-1, 1, (len(token_slot), IN)).astype(np.float32)
    bases = [rng.uniform(-1, 1, (len(token_slot), OUT)).astype(np.float32) for _ in range(2)]

    def expected(b_pool, base):
        y = lora_ref.ref_shrink(x[:, None], token_slot, pool_a, table, counts)
        return np.asarray(lora_ref.ref_expand(y, base[:, None], token_slot, b_pool, table, counts))[:, 0]

    refs = [expected(pool_b, bases[0]), expected(pool_b2, bases[1])]
    rows = lora_ops.lora_rows(
        x.T, tuple(b.T for b in bases), token_slot, (pool_a, pool_a), (pool_b, pool_b2), table, counts, impl
    )
    groups = np.array([3, 6, 1, 0, 0], np.int32)
    packed = lora_ops.lora_groups(
        x.T, tuple(b.T for b in bases), token_slot, groups, (pool_a, pool_a), (pool_b, pool_b2), table, counts, impl
    )
    for got in (rows, packed):
        for out, ref in zip(got, refs, strict=True):
            np.testing.assert_allclose(np.asarray(out).T, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_an_adapter_with_non_finite_pages_changes_no_other_token(impl, monkeypatch):
    """Adapter 6's pages hold Inf and NaN (weights gone wrong on the device): in a packed
    prefill and in decode rows, every token of another adapter, or of none, gets exactly what it
    gets when adapter 6 is clean (a zeroed input times an Inf page would be NaN)."""
    interpret_kernels(impl, monkeypatch)
    pool_a, pool_b, table, counts, _ = build_pool(8, np.float32)
    rng = np.random.default_rng(5)
    token_slot = np.array([3, 3, 3, 0, 0, 6, 6, 1, 3, 0], np.int32)
    x = rng.uniform(-1, 1, (len(token_slot), IN)).astype(np.float32)
    base = rng.uniform(-1, 1, (len(token_slot), OUT)).astype(np.float32)
    groups = np.array([3, 6, 1, 0, 0], np.int32)

    def run_both(a, b):
        rows = lora_ops.lora_rows(x.T, (base.T,), token_slot, (a,), (b,), table, counts, impl)[0]
        packed = lora_ops.lora_groups(x.T, (base.T,), token_slot, groups, (a,), (b,), table, counts, impl)[0]
        return np.asarray(rows).T, np.asarray(packed).T

    clean = run_both(pool_a, pool_b)
    bad_a, bad_b = pool_a.copy(), pool_b.copy()
    for page in table[6, : counts[6]]:
        bad_a[page, 0, 0], bad_b[page] = np.nan, np.inf
    others = token_slot != 6
    for got, want in zip(run_both(bad_a, bad_b), clean, strict=True):
        assert np.isfinite(got[others]).all()
        np.testing.assert_allclose(got[others], want[others], atol=1e-6, rtol=1e-6)


def test_strict_tpu_interpret_catches_bad_page_ids():
    """Out-of-range page ids raise under the TPU interpret params (plain interpret clamps them)."""
    pool_a, _, table, counts, _ = build_pool(8, np.float32)
    table = table.copy()
    table[1, 0] = pool_a.shape[0] + 5
    x = np.ones((1, 1, IN), np.float32)
    with pytest.raises(Exception, match=r"(?i)out of bounds|index"):
        jax.block_until_ready(
            lora_tpu.shrink(x, np.array([1], np.int32), pool_a, table, counts, interpret=pltpu.InterpretParams())
        )


@pytest.mark.parametrize("tokens", [1, 64])
def test_lowering_for_cuda_and_tpu(tokens):
    pool_a, pool_b, table, counts, _ = build_pool(16, jnp.bfloat16)
    x = jnp.zeros((4, tokens, IN), jnp.bfloat16)
    base = jnp.zeros((4, tokens, OUT), jnp.bfloat16)
    row_slot = np.array([1, 0, 2, 3], np.int32)
    args = (x, base, row_slot, pool_a, pool_b, table, counts)

    def gpu(x, base, row_slot, pool_a, pool_b, table, counts):
        return lora_gpu.expand(
            lora_gpu.shrink(x, row_slot, pool_a, table, counts), base, row_slot, pool_b, table, counts
        )

    def tpu(x, base, row_slot, pool_a, pool_b, table, counts):
        return lora_tpu.expand(
            lora_tpu.shrink(x, row_slot, pool_a, table, counts), base, row_slot, pool_b, table, counts
        )

    cuda_text = jax.jit(gpu).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert cuda_text.count("triton") >= 2
    tpu_text = jax.jit(tpu).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert tpu_text.count("tpu_custom_call") >= 2


def test_dispatch_switch():
    assert lora_ops.resolve("auto") == "xla"  # this CPU
    assert lora_ops.resolve("pallas_tpu") == "pallas_tpu"
    with pytest.raises(ValueError, match="implementation"):
        lora_ops.resolve("cuda")
    # Shapes the Triton kernels cannot tile fall back to XLA.
    assert not lora_gpu.supported(1, 100, 96, 8)
    assert lora_gpu.supported(1, 64, 96, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("page_rows", [8, 16])
def test_compiled_gpu_kernels_match_reference(page_rows):
    """On a GPU: the compiled (not interpreted) Triton kernels against the reference."""
    pool_a, pool_b, table, counts, _ = build_pool(page_rows, np.float32)
    rng = np.random.default_rng(0)
    for tokens in (1, 16, 64):
        row_slot = np.asarray(CASES["mixed_with_base_rows"], np.int32)
        x = rng.uniform(-1, 1, (8, tokens, IN)).astype(np.float32)
        base = rng.uniform(-1, 1, (8, tokens, OUT)).astype(np.float32)
        ref = lora_ref.ref_expand(
            lora_ref.ref_shrink(x, row_slot, pool_a, table, counts), base, row_slot, pool_b, table, counts
        )
        y = lora_gpu.shrink(x, row_slot, pool_a, table, counts)
        out = lora_gpu.expand(y, base, row_slot, pool_b, table, counts)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_compiled_gpu_kernels_bf16():
    pool_a, pool_b, table, counts, _ = build_pool(16, jnp.bfloat16)
    rng = np.random.default_rng(2)
    row_slot = np.asarray(CASES["every_row_different"], np.int32)
    x = jnp.asarray(rng.uniform(-1, 1, (8, 16, IN)), jnp.bfloat16)
    base = jnp.asarray(rng.uniform(-1, 1, (8, 16, OUT)), jnp.bfloat16)
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    ref = lora_ref.ref_expand(
        lora_ref.ref_shrink(f32(x), row_slot, f32(pool_a), table, counts),
        f32(base),
        row_slot,
        f32(pool_b),
        table,
        counts,
    )
    out = lora_gpu.expand(lora_gpu.shrink(x, row_slot, pool_a, table, counts), base, row_slot, pool_b, table, counts)
    assert out.dtype == jnp.bfloat16
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(ref), atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.gpu
def test_engine_on_gpu_gives_the_same_greedy_tokens_with_both_lora_paths(tmp_path):
    """A whole engine with two adapters of different ranks: the Triton LoRA path against XLA's."""
    from plora_jax import Engine, SamplingParams
    from plora_jax.config import tiny
    from plora_jax.lora.peft import save_random_adapter
    from plora_jax.models.llama import init_params

    config = tiny(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512)
    params = init_params(config, jnp.float32, seed=1, scale=0.05)
    for i, rank in enumerate((8, 24)):
        save_random_adapter(tmp_path / f"a{i}", config, rank, ("q_proj", "v_proj", "o_proj"), seed=i)
    prompt = list(range(1, 40))
    prompts = [prompt, prompt, prompt, list(range(7, 20))]
    adapters = ["a0", "a1", None, "a1"]
    outs = {}
    for impl in ("xla", "pallas_gpu"):
        with Engine.from_params(config, params, dtype="float32", warmup=False, lora_implementation=impl) as engine:
            for name in ("a0", "a1"):
                engine.add_adapter(name, tmp_path / name)
            result = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), adapters)
            outs[impl] = [o.token_ids for o in result]
    assert len({tuple(t) for t in outs["xla"][:3]}) == 3  # both adapters change the base model's output
    assert outs["xla"] == outs["pallas_gpu"]
