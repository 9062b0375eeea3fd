"""The vectorised sampler: greedy, top-k, top-p, temperature, per-row seeds."""

import jax
import jax.numpy as jnp
import numpy as np

from plora_jax.engine.sampling import sample_tokens

_sample = jax.jit(sample_tokens)

V = 8


def _run(logits, temperature, top_k, top_p, seeds, steps=None):
    b = len(temperature)
    steps = np.zeros(b, np.int32) if steps is None else steps
    return np.asarray(
        _sample(  # compiled once per shape (eager, each call re-traced the whole sampler)
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(temperature, jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(seeds, jnp.uint32),
            jnp.asarray(steps, jnp.int32),
        )
    )


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, V)) * 3
    best = logits.argmax(-1)
    assert (_run(logits, [0.0] * 6, [0] * 6, [1.0] * 6, range(6)) == best).all()
    assert (_run(logits, [1.5] * 6, [1] * 6, [1.0] * 6, range(6)) == best).all()
    assert (_run(logits, [1.5] * 6, [0] * 6, [1e-6] * 6, range(6)) == best).all()
    # A top_p that rounds to 0 in float32 (the API accepts 5e-324) still keeps the likeliest token.
    assert (_run(logits, [1.5] * 6, [0] * 6, [5e-324] * 6, range(6)) == best).all()


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.05, 0.03, 0.01, 0.005, 0.005]]))
    n = 400
    tokens_k = _run(np.repeat(logits, n, 0), [1.0] * n, [2] * n, [1.0] * n, range(n))
    assert set(tokens_k.tolist()) == {0, 1}
    # top_p 0.75: the prefix {0.4, 0.3, 0.2} is the smallest reaching 0.75.
    tokens_p = _run(np.repeat(logits, n, 0), [1.0] * n, [0] * n, [0.75] * n, range(n))
    assert set(tokens_p.tolist()) == {0, 1, 2}


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0]) + 1e-12
    n = 4000
    tokens = _run(np.repeat(np.log(probs)[None], n, 0), [1.0] * n, [0] * n, [1.0] * n, range(n))
    freq = np.bincount(tokens, minlength=V) / n
    np.testing.assert_allclose(freq[:4], probs[:4], atol=0.03)


def test_rows_are_seeded_independently():
    logits = np.zeros((3, V))
    a = _run(logits, [1.0] * 3, [0] * 3, [1.0] * 3, [7, 8, 9], steps=np.array([0, 4, 2]))
    b = _run(np.zeros((1, V)), [1.0], [0], [1.0], [8], steps=np.array([4]))
    assert a[1] == b[0]
    draws = {int(_run(logits[:1], [1.0], [0], [1.0], [5], steps=np.array([s]))[0]) for s in range(40)}
    assert len(draws) > 3  # the step index changes the draw
