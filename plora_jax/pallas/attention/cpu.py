"""Paged decode attention on XLA:CPU as a small C++ kernel behind XLA's FFI (`cpu_kernel.cc`).

Pallas has no CPU backend, and XLA:CPU's own code for this op runs at a fraction of memory
bandwidth (it copies the gathered blocks, then runs tiny batched dots; see
docs/performance.md). The kernel reads each row's blocks straight from the paged cache, once.

Building. The kernel is compiled on first use with the system C++ compiler (`$CXX`, else
`c++`/`g++`) against the FFI headers that ship inside jaxlib, for this machine's CPU
(`-march=native`), into `<cache>/kernels/`, keyed by the source, the flags, the jaxlib version
and the CPU. Building takes a few seconds once; later processes load the file, but only from a
folder no other user can write and only if the MAC written with it matches
(`plora_jax.trusted_cache`): loading a library runs its code. Otherwise it is built again (in a
private temporary folder when the cache folder is not trusted), with a warning. Where no
compiler works, `available()` is False and the switch in `ops` uses the XLA path instead; a
build failure is logged once, never raised. `PLORA_CPU_KERNEL=0` turns the kernel off.

Layout: K blocks transposed, `[num_kv_heads, num_blocks, head_dim, block_size]` (see
`reference`), so a block's scores are `head_dim` whole-vector multiply-adds. Shapes: float32
(the CPU default), block size 16, head_dim 64 or 128, and 1, 2, 3, 4 or 8 query heads per KV
head (`supported`); the switch in `ops` sends other shapes to the XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ...shared_cache import SharedCache
from ...trusted_cache import Sealer

log = logging.getLogger(__name__)

TARGET = "plora_paged_decode"
SOURCE = Path(__file__).with_name("cpu_kernel.cc")
# Reassociation lets the compiler vectorise the reductions. Never -ffast-math: linked into a
# shared library it sets flush-to-zero for the whole process (GCC's crtfastmath.o).
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-std=c++17",
    "-shared",
    "-fPIC",
)

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided, "path": the library, "error": why not


GROUPS = (1, 2, 3, 4, 8)  # query heads per KV head instantiated in cpu_kernel.cc


def supported(group: int, head_dim: int, block_size: int) -> bool:
    return group in GROUPS and head_dim in (64, 128) and block_size == 16


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    except OSError:
        flags = model = ""
    return f"{platform.machine()}|{model}|{flags}"


def kernel_key() -> str:
    """Hash of everything the built library depends on (also part of the executable-cache key)."""
    import jaxlib

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"|{FLAGS}|{jaxlib.__version__}|{_cpu_id()}".encode())
    return digest.hexdigest()[:16]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cache_dir: Path, shared: SharedCache | None = None) -> Path:
    """The kernel's library: the cached one in `cache_dir` if its MAC matches, else the shared
    compile cache's (verified there), else compiled now and published (cached with its MAC; in
    a private temporary folder if `cache_dir` is not trusted)."""
    cache_dir = Path(cache_dir)
    sealer = Sealer(cache_dir, cache_dir.parent)
    if not sealer.usable:
        log.warning("CPU kernel cache not used: %s (building in a private temporary folder)", sealer.reason)
        return _compile(Path(tempfile.mkdtemp(prefix="plora-kernel-")) / "attention.so")
    out = cache_dir / f"attention-{kernel_key()}.so"
    if out.is_file():
        data, why = sealer.read(out)
        if data is not None:
            return out
        log.warning("cached CPU kernel %s is not loaded (%s); building it again", out, why)
    if shared is not None:
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            if shared.pull("kernels", kernel_key(), None, Path(tmp)) == [out.name]:
                sealer.write(out, (Path(tmp) / out.name).read_bytes())
                return out
    partial = _compile(out.with_name(f"{out.name}.tmp{os.getpid()}"))
    sealer.write(out, partial.read_bytes())  # atomic: a concurrent start never loads a half-written file
    partial.unlink()
    if shared is not None:
        shared.publish("kernels", kernel_key(), None, cache_dir, [out.name])
    return out


def _compile(target: Path) -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return target


def ensure(cache_dir: Path, shared: SharedCache | None = None) -> bool:
    """Build (if needed), load and register the kernel once per process; False if unavailable."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("PLORA_CPU_KERNEL", "1") == "0":
            _state.update(ok=False, error="disabled by PLORA_CPU_KERNEL=0")
            return False
        try:
            path = build(cache_dir, shared)
            library = ctypes.cdll.LoadLibrary(str(path))
            if not path.is_relative_to(cache_dir):  # built in a private temporary folder: loaded, so gone
                shutil.rmtree(path.parent, ignore_errors=True)
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.PloraPagedDecode), platform="cpu")
            _state.update(ok=True, path=path, library=library)
        except Exception as e:  # a missing compiler or a failed build: the XLA path serves instead
            log.warning("CPU attention kernel unavailable (%s); using the XLA path", e)
            _state.update(ok=False, error=str(e))
        return _state["ok"]


def available() -> bool:
    """Whether `ensure` succeeded in this process (it must be called first)."""
    return _state.get("ok", False)


def decode(q, k_cache, v_cache, block_tables, context_lens, sliding_window=None):
    """q [batch, num_heads, head_dim] f32, K blocks transposed -> [batch, num_heads, head_dim];
    see `reference.ref_decode`."""
    if not available():
        raise RuntimeError("the CPU attention kernel is not loaded (call cpu.ensure first)")
    head_dim = q.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(
        (q * head_dim**-0.5).astype(jnp.float32),
        k_cache,
        v_cache,
        block_tables.astype(jnp.int32),
        context_lens.astype(jnp.int32),
        window=np.int64(sliding_window or 0),
    )
