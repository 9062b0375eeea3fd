"""The caches that hold code run none they did not write: a pickle payload planted over a cached
executable is never unpickled, a library planted over the CPU kernel is never loaded, a cache
folder other users can write is not used at all, and the folders the engine creates are 0700."""

from __future__ import annotations

import logging
import os
import pickle
import stat

import jax
import jax.numpy as jnp
import pytest

from plora_jax.engine.compile_plan import ExecutableCache
from plora_jax.trusted_cache import KEY_FILE, Sealer, private_dir, untrusted_reason

FINGERPRINT = {"test": "trusted-cache"}


class Payload:
    """Unpickling this touches `marker`: what an attacker's file would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def compiled():
    return jax.jit(lambda x: x * 2 + 1).trace(jax.ShapeDtypeStruct((3,), jnp.float32)).lower().compile()


def test_a_cached_executable_round_trips_and_a_planted_pickle_never_runs(tmp_path, caplog):
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    cache.save("step", compiled())
    loaded = ExecutableCache(tmp_path, FINGERPRINT).load("step")
    assert loaded is not None and loaded(jnp.ones(3)).tolist() == [3.0, 3.0, 3.0]
    marker = tmp_path / "pwned"
    path = cache._path("step")
    path.write_bytes(pickle.dumps(Payload(marker)))
    with caplog.at_level(logging.WARNING):
        assert ExecutableCache(tmp_path, FINGERPRINT).load("step") is None
    assert not marker.exists() and not path.exists()
    assert any("integrity check failed" in r.getMessage() for r in caplog.records)
    assert pickle.loads(pickle.dumps(Payload(marker))) is None and marker.exists()  # the payload is real


@pytest.mark.parametrize("where", ["executables", "root"])
def test_a_folder_others_can_write_is_not_used(tmp_path, caplog, where):
    cache = ExecutableCache(tmp_path, FINGERPRINT)
    cache.save("step", compiled())
    loose = cache.dir if where == "executables" else tmp_path
    loose.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        again = ExecutableCache(tmp_path, FINGERPRINT)
        assert again.load("step") is None
        again.save("other", compiled())
    assert not again._path("other").exists()
    assert any("writable by its group or by everyone" in r.getMessage() for r in caplog.records)


def test_created_folders_and_the_key_are_private(tmp_path):
    root = tmp_path / "cache"
    cache = ExecutableCache(root, FINGERPRINT)
    cache.save("step", compiled())
    for folder in (root, root / "executables", cache.dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((root / KEY_FILE).stat().st_mode) == 0o600
    assert untrusted_reason(cache.dir, root) is None
    (root / KEY_FILE).chmod(0o644)
    assert not Sealer(cache.dir, root).usable  # a key others can read is no key
    assert private_dir(root / "a" / "b", root) == root / "a" / "b"
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o700


@pytest.mark.slow
def test_a_tampered_kernel_library_is_rebuilt_not_loaded(tmp_path, caplog):
    from plora_jax.pallas.attention import cpu

    if cpu._compiler() is None:
        pytest.skip("no C++ compiler here")
    kernels = tmp_path / "kernels"
    built = cpu.build(kernels)
    original = built.read_bytes()
    built.write_bytes(b"\x7fELF planted")  # what another user could have written
    with caplog.at_level(logging.WARNING):
        assert cpu.build(kernels) == built
    assert built.read_bytes() == original
    assert any("is not loaded" in r.getMessage() for r in caplog.records)
    kernels.chmod(0o777)
    elsewhere = cpu.build(kernels)
    assert not elsewhere.is_relative_to(kernels) and elsewhere.read_bytes()[:4] == b"\x7fELF"
