"""Paged attention: the jnp reference on a hand-worked case, then every path against it (the XLA
loops in both K layouts, the C++ CPU kernel, jax's Pallas Triton and Mosaic kernels in interpret
mode) on decode and packed prefill with GQA, sliding windows, rows of very different lengths
and padding; f32 within 1e-5. Lowering for CUDA and TPU from this CPU catches what interpret
mode accepts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plora_jax.models.registry import cache_root
from plora_jax.pallas.attention import cpu, ops, reference, xla

KV, BS, D = 2, 16, 64  # a shape the CPU kernel instantiates (3 query heads per KV head)
HEADS = 6


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    cpu.ensure(cache_root() / "kernels")  # built once per machine, as the engine does


def test_reference_decode_hand_worked_case():
    # One KV head, one query head, head_dim 2, blocks of 2 tokens; the row owns blocks [3, 1].
    k = np.zeros((1, 4, 2, 2), np.float32)
    v = np.zeros((1, 4, 2, 2), np.float32)
    k[0, 3] = [[1, 0], [0, 1]]  # positions 0, 1
    k[0, 1] = [[1, 1], [9, 9]]  # position 2, then a slot past the context (never read)
    v[0, 3] = [[1, 0], [0, 2]]
    v[0, 1] = [[3, 3], [100, 100]]
    q = np.array([[[np.sqrt(2.0) * np.log(2.0), 0.0]]], np.float32)  # scaled by 2^-0.5: scores ln2*(1, 0, 1)
    out = reference.ref_decode(q, k, v, np.array([[3, 1]], np.int32), np.array([3], np.int32))
    weights = np.array([2.0, 1.0, 2.0]) / 5.0  # softmax of ln2 * (1, 0, 1)
    expected = weights @ np.array([[1, 0], [0, 2], [3, 3]], np.float64)
    np.testing.assert_allclose(np.asarray(out)[0, 0], expected, rtol=1e-6)
    # A sliding window of 2 sees positions 1 and 2 only; a row of length 0 gives zeros.
    out = reference.ref_decode(
        np.concatenate([q, q]), k, v, np.array([[3, 1], [0, 0]], np.int32), np.array([3, 0], np.int32), 2
    )
    expected = np.array([1.0, 2.0]) / 3.0 @ np.array([[0, 2], [3, 3]], np.float64)
    np.testing.assert_allclose(np.asarray(out)[0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[1], 0.0)


def make_cache(num_blocks: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((KV, num_blocks, BS, D)).astype(np.float32)
    v = rng.standard_normal((KV, num_blocks, BS, D)).astype(np.float32)
    k[:, 0] = v[:, 0] = 0  # reserved block
    return k, v


def decode_case(seed: int = 1):
    """Rows of 1, 17, 130, 0 (padding) and 45 tokens on shuffled blocks of a 40-block cache."""
    rng = np.random.default_rng(seed)
    lens = np.array([1, 17, 130, 0, 45], np.int32)
    width = 12
    free = list(rng.permutation(np.arange(1, 40)))
    tables = np.zeros((len(lens), width), np.int32)
    for r, n in enumerate(lens):
        used = -(-n // BS)
        tables[r, :used] = [free.pop() for _ in range(used)]
    q = rng.standard_normal((len(lens), HEADS, D)).astype(np.float32)
    return q, tables, lens


def k_layout(k, transposed: bool):
    return np.swapaxes(k, 2, 3).copy() if transposed else k


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("path", ["xla", "xla_transposed", "cpu", "gpu_interpret", "tpu_interpret"])
def test_decode_paths_match_the_reference(path, window):
    k, v = make_cache(40)
    q, tables, lens = decode_case()
    if path == "tpu_interpret":  # jax's TPU kernel reads K and V as bfloat16: give it values bf16 holds exactly
        k, v = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (k, v))
    expected = np.asarray(reference.ref_decode(q, k, v, tables, lens, window))
    if path == "xla":
        got = xla.xla_decode(q, k, v, tables, lens, window, chunk_blocks=3)
    elif path == "xla_transposed":
        got = xla.xla_decode(q, k_layout(k, True), v, tables, lens, window, True, chunk_blocks=3)
    elif path == "cpu":
        if not cpu.available():
            pytest.skip(f"the CPU kernel is not built here: {cpu._state.get('error')}")
        got = cpu.decode(q, k_layout(k, True), v, tables, lens, window)
    else:
        if window is not None:
            pytest.skip("jax's Pallas paged-attention kernels have no sliding window (the switch uses XLA)")
        if path == "gpu_interpret":
            from plora_jax.pallas.attention import gpu

            got = gpu.decode(q, k, v, tables, lens, interpret=True)
        else:
            from jax.experimental.pallas import tpu as pltpu

            from plora_jax.pallas.attention import tpu

            with pltpu.force_tpu_interpret_mode(), jax.default_matmul_precision("highest"):
                got = tpu.decode(q, k, v, tables, lens)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


def prefill_case(seed: int = 2):
    """Segment 0 continues a prompt (40 tokens already cached, 9 new); segments 1 and 2 are
    first chunks of 5 and 18 tokens; 0 padding tokens fill the row to 40."""
    rng = np.random.default_rng(seed)
    k_cache, v_cache = make_cache(40, seed)
    starts, sizes = [40, 0, 0], [9, 5, 18]
    segments, width = 4, 12
    free = list(rng.permutation(np.arange(1, 40)))
    tables = np.zeros((segments, width), np.int32)
    tokens = 40
    positions = np.zeros(tokens, np.int32)
    slots = np.zeros(tokens, np.int32)
    segment_ids = np.full(tokens, -1, np.int32)
    offset = 0
    for s, (start, n) in enumerate(zip(starts, sizes, strict=True)):
        used = -(-(start + n) // BS)
        tables[s, :used] = [free.pop() for _ in range(used)]
        pos = np.arange(start, start + n)
        positions[offset : offset + n] = pos
        slots[offset : offset + n] = tables[s, pos // BS] * BS + pos % BS
        segment_ids[offset : offset + n] = s
        offset += n
    q = rng.standard_normal((tokens, HEADS, D)).astype(np.float32)
    k_new = rng.standard_normal((tokens, KV, D)).astype(np.float32)
    v_new = rng.standard_normal((tokens, KV, D)).astype(np.float32)
    seq_starts = np.array([*starts, 0], np.int32)
    return q, k_new, v_new, k_cache, v_cache, positions, slots, segment_ids, tables, seq_starts


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("transposed", [False, True])
def test_packed_prefill_matches_the_reference(window, transposed):
    q, k, v, k_cache, v_cache, positions, slots, segment_ids, tables, starts = prefill_case()
    kc, vc = reference.write_kv(
        jnp.asarray(k_layout(k_cache, transposed)), jnp.asarray(v_cache), k, v, slots, transposed
    )
    expected = reference.ref_prefill(q, k, v, kc, vc, positions, segment_ids, tables, starts, window, transposed)
    got = xla.xla_prefill(q, k, v, kc, vc, positions, segment_ids, tables, starts, window, transposed, chunk_blocks=2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(got)[segment_ids < 0]).max() == 0  # padding tokens give zeros


def test_write_kv_lands_where_the_reference_reads_in_both_layouts():
    k_cache, v_cache = make_cache(8)
    rng = np.random.default_rng(3)
    k = rng.standard_normal((3, KV, D)).astype(np.float32)
    slots = np.array([5 * BS + 2, 1 * BS + 0, 7 * BS + 15], np.int32)
    for transposed in (False, True):
        kc, vc = reference.write_kv(
            jnp.asarray(k_layout(k_cache, transposed)), jnp.asarray(v_cache), k, k, slots, transposed
        )
        blocks = reference.k_blocks(kc, transposed)
        for i, slot in enumerate(slots):
            np.testing.assert_array_equal(np.asarray(blocks)[:, slot // BS, slot % BS], k[i])
            np.testing.assert_array_equal(np.asarray(vc)[:, slot // BS, slot % BS], k[i])


def test_switch_resolves_per_backend_and_shape():
    assert ops.resolve("auto", 9, 3, 64, 16, jnp.float32) in ("cpu", "xla")  # this CPU
    assert ops.resolve("auto", 4, 2, 16, 8, jnp.float32) == "xla"  # a shape the kernel does not take
    assert ops.resolve("pallas_tpu", 9, 3, 64, 16, jnp.float32) == "pallas_tpu"
    with pytest.raises(ValueError, match="CPU attention kernel takes float32"):
        ops.resolve("cpu", 9, 3, 64, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        ops.resolve("cuda", 9, 3, 64, 16, jnp.float32)
    assert ops.k_transposed("cpu") and not ops.k_transposed("pallas_gpu")


def test_loading_the_cpu_kernel_keeps_ieee_subnormals():
    """The kernel is built without -ffast-math, which would turn on flush-to-zero process-wide."""
    if not cpu.available():
        pytest.skip("the CPU kernel is not built here")
    tiny = np.float32(1e-40)  # a subnormal
    assert tiny > 0 and tiny / np.float32(2) > 0


@pytest.mark.parametrize("width", [256, 33, 13, 3])
def test_cuda_and_tpu_lowering_at_llama3_8b_shapes(width):
    """jax's Pallas kernels lower for both accelerators from this CPU at real shapes (bf16, 32
    query heads, 8 KV heads, head_dim 128, blocks of 16) and table widths with and without a
    power-of-two divisor (33 blocks: a 528-token context, which Triton refused before padding)."""
    from plora_jax.pallas.attention import gpu, tpu

    batch, heads, kv, d, blocks = 8, 32, 8, 128, 4096
    s = jax.ShapeDtypeStruct
    args = (
        s((batch, heads, d), jnp.bfloat16),
        s((kv, blocks, BS, d), jnp.bfloat16),
        s((kv, blocks, BS, d), jnp.bfloat16),
        s((batch, width), jnp.int32),
        s((batch,), jnp.int32),
    )
    cuda_text = jax.jit(gpu.decode).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in cuda_text
    tpu_text = jax.jit(tpu.decode).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in tpu_text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_gpu_decode_matches_the_reference(dtype):
    """jax's Pallas Triton paged attention, compiled for the GPU (not interpreted)."""
    from plora_jax.pallas.attention import gpu

    k, v = make_cache(40)
    q, tables, lens = decode_case()
    cast = lambda a: jnp.asarray(a, dtype)
    expected = reference.ref_decode(*(np.asarray(cast(a), np.float32) for a in (q, k, v)), tables, lens)
    got = jax.jit(gpu.decode)(cast(q), cast(k), cast(v), tables, lens)
    tolerance = 2e-3 if dtype == "float32" else 2e-2  # TF32 / bf16 dots
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected), atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
def test_engine_on_gpu_gives_the_same_greedy_tokens_with_every_attention_path():
    from plora_jax import Engine, SamplingParams
    from plora_jax.config import tiny
    from plora_jax.models.llama import init_params

    config = tiny(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512)
    params = init_params(config, jnp.float32, seed=1, scale=0.05)
    prompts = [list(range(1, 40)), list(range(7, 20))]
    outs = {}
    for impl in ("xla", "pallas_gpu"):
        with Engine.from_params(
            config, params, dtype="float32", warmup=False, max_loras=0, attention_implementation=impl
        ) as engine:
            result = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            outs[impl] = [o.token_ids for o in result]
    assert outs["xla"] == outs["pallas_gpu"]


@pytest.mark.parametrize(("groups", "head_dim"), [(1, 64), (2, 128), (4, 64), (8, 128)])
def test_cpu_kernel_every_group_size_and_head_dim(groups, head_dim):
    """The C++ kernel's other instantiations (query heads per KV head, head_dim) against the reference."""
    if not cpu.available():
        pytest.skip(f"the CPU kernel is not built here: {cpu._state.get('error')}")
    rng = np.random.default_rng(groups * head_dim)
    kv, blocks = 2, 24
    k = rng.standard_normal((kv, blocks, BS, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv, blocks, BS, head_dim)).astype(np.float32)
    lens = np.array([3, 0, 70, 33], np.int32)
    tables = np.zeros((4, 8), np.int32)
    free = list(rng.permutation(np.arange(1, blocks)))
    for r, n in enumerate(lens):
        tables[r, : -(-n // BS)] = [free.pop() for _ in range(-(-n // BS))]
    q = rng.standard_normal((4, kv * groups, head_dim)).astype(np.float32)
    expected = np.asarray(reference.ref_decode(q, k, v, tables, lens, None))
    got = cpu.decode(q, k_layout(k, True), v, tables, lens, None)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_clamps_a_length_past_its_table_and_bad_block_ids():
    """A row whose length runs past its block table reads only its table (as the XLA path does),
    and a block id outside the cache reads the reserved block, never memory past the cache."""
    if not cpu.available():
        pytest.skip(f"the CPU kernel is not built here: {cpu._state.get('error')}")
    k, v = make_cache(40)
    q, tables, lens = decode_case()
    full = tables.shape[1] * BS
    long = lens.copy()
    long[2] = full + 100
    clamped = lens.copy()
    clamped[2] = full
    bad, as_block_0 = tables.copy(), tables.copy()
    bad[4, 1] = 10_000  # inside row 4's length (45 tokens: 3 blocks)
    as_block_0[4, 1] = 0
    got = np.asarray(cpu.decode(q, k_layout(k, True), v, bad, long, None))
    expected = np.asarray(cpu.decode(q, k_layout(k, True), v, as_block_0, clamped, None))
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("path", ["reference", "xla", "xla_transposed"])
def test_a_poisoned_segment_never_reaches_the_segments_packed_with_it(path):
    """Segment 1's own K/V are NaN and Inf (an adapter gone wrong), and the stale tail of
    segment 0's last block holds NaN (a reused block's previous owner): segments 0 and 2 get
    exactly what they get from a clean step, on every path."""
    transposed = path == "xla_transposed"
    q, k, v, k_cache, v_cache, positions, slots, segment_ids, tables, starts = prefill_case()

    def run(k, v, k_cache, v_cache):
        kc, vc = reference.write_kv(
            jnp.asarray(k_layout(k_cache, transposed)), jnp.asarray(v_cache), k, v, slots, transposed
        )
        args = (q, k, v, kc, vc, positions, segment_ids, tables, starts)
        if path == "reference":
            return np.asarray(reference.ref_prefill(*args))
        return np.asarray(xla.xla_prefill(*args, None, transposed, chunk_blocks=2))

    clean = run(k, v, k_cache, v_cache)
    k2, v2, kc2, vc2 = k.copy(), v.copy(), k_cache.copy(), v_cache.copy()
    k2[segment_ids == 1], v2[segment_ids == 1] = np.nan, np.inf
    last = tables[0, (40 + 9 - 1) // BS]  # segment 0's last block: positions 49.. are stale
    kc2[:, last, (40 + 9) % BS :], vc2[:, last, (40 + 9) % BS :] = np.nan, np.nan
    poisoned = run(k2, v2, kc2, vc2)
    others = (segment_ids == 0) | (segment_ids == 2)
    assert np.isfinite(poisoned[others]).all()
    np.testing.assert_allclose(poisoned[others], clean[others], atol=1e-6, rtol=1e-6)


def test_the_cache_never_holds_a_non_finite_value():
    """write_kv stores NaN and Inf as 0, so a kernel that multiplies a masked position's zero
    probability by its value (jax's GPU and TPU decode kernels read whole pages) gets 0."""
    k_cache, v_cache = make_cache(8)
    k = np.full((2, KV, D), np.nan, np.float32)
    v = np.full((2, KV, D), np.inf, np.float32)
    slots = np.array([3 * BS + 1, 5 * BS + 7], np.int32)
    for transposed in (False, True):
        kc, vc = reference.write_kv(
            jnp.asarray(k_layout(k_cache, transposed)), jnp.asarray(v_cache), k, v, slots, transposed
        )
        assert np.isfinite(np.asarray(kc)).all() and np.isfinite(np.asarray(vc)).all()
        np.testing.assert_array_equal(np.asarray(reference.k_blocks(kc, transposed))[:, 3, 1], 0.0)


@pytest.mark.parametrize("path", ["reference", "xla", "cpu"])
def test_stale_non_finite_tails_of_reused_blocks_never_reach_decode(path):
    """Every cache position past a row's length, in the blocks it owns, is NaN: decode gives
    what it gives over a clean cache."""
    k, v = make_cache(40)
    q, tables, lens = decode_case()
    k2, v2 = k.copy(), v.copy()
    for row, n in enumerate(lens):
        if n % BS:
            block = tables[row, n // BS]
            k2[:, block, n % BS :], v2[:, block, n % BS :] = np.nan, np.nan

    def run(k, v):
        if path == "reference":
            return np.asarray(reference.ref_decode(q, k, v, tables, lens))
        if path == "xla":
            return np.asarray(xla.xla_decode(q, k, v, tables, lens, chunk_blocks=3))
        if not cpu.available():
            pytest.skip(f"the CPU kernel is not built here: {cpu._state.get('error')}")
        return np.asarray(cpu.decode(q, k_layout(k, True), v, tables, lens))

    clean, poisoned = run(k, v), run(k2, v2)
    assert np.isfinite(poisoned).all()
    np.testing.assert_allclose(poisoned, clean, atol=1e-6, rtol=1e-6)
