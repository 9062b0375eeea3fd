"""Load a model by name or path, caching the converted parameters with orbax-checkpoint.

The first start of a GGUF model parses the file, dequantizes every tensor and converts the
result to the Flax layout: seconds of work that do not change between starts. The converted
tree is saved with orbax under `<cache>/params/<model>-<dtype>-<key>/`, next to the model config
and the tokenizer, so a cached start restores arrays and never opens the source file. The key
hashes the source files' paths, sizes and modification times, the dtype and `CACHE_FORMAT`:
editing a checkpoint or changing the conversion invalidates the entry.

The cache entry is written to a temporary folder and renamed into place, so a crash or a
concurrent start never leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from ..config import ModelConfig
from ..shared_cache import SharedCache
from ..tokenizer import Tokenizer
from ..trusted_cache import private_dir
from .convert import CheckpointError
from .gguf_loader import config_from_gguf, load_gguf, open_gguf
from .hf_loader import config_from_hf, load_hf_folder
from .llama import param_shapes
from .registry import cache_root, resolve_model

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the conversion changes what is stored (3: per-layer subtrees, [out, in] weights)
_HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


@dataclass
class LoadedModel:
    config: ModelConfig
    params: dict  # Flax params tree, numpy arrays in the compute dtype
    tokenizer: Tokenizer
    source: Path
    from_cache: bool
    load_seconds: float


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _source_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(
        [p for p in source.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")]
        + [source / f for f in _HF_FILES if (source / f).is_file()]
    )


def content_key(source: Path, dtype, local_key: str, root: Path) -> str:
    """A key of the model's bytes (sha256 of its files), the same on every node: what the shared
    compile cache's parameter entries are named by. Hashed once per local file identity
    (`local_key`), remembered under the cache root."""
    memo = root / "params" / f"content-{local_key}.txt"
    with contextlib.suppress(OSError):
        return memo.read_text().strip()
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{_dtype_name(dtype)}".encode())
    for f in _source_files(source):
        digest.update(f"|{f.name}|".encode())
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    key = digest.hexdigest()[:16]
    with contextlib.suppress(OSError):
        private_dir(memo.parent, root)
        memo.write_text(key)
    return key


def cache_key(source: Path, dtype) -> str:
    files = _source_files(source)
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{_dtype_name(dtype)}".encode())
    for f in files:
        st = f.stat()
        # The inode and ctime too: a same-size file copied over with its mtime kept (cp -p,
        # rsync -a) is another file, and restoring the old one's parameters would be silent.
        digest.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}".encode())
    return digest.hexdigest()[:16]


def _convert(source: Path, dtype) -> tuple[ModelConfig, dict, Tokenizer]:
    if source.is_file():
        return load_gguf(source, dtype)
    config, params = load_hf_folder(source, dtype)
    return config, params, Tokenizer.from_hf_folder(source)


def _quiet_orbax():
    import absl.logging

    # orbax logs every save/restore step at INFO/WARNING through absl.
    absl.logging.set_verbosity(absl.logging.ERROR)


def _save_entry(entry: Path, config: ModelConfig, params: dict, tokenizer: Tokenizer) -> None:
    import orbax.checkpoint as ocp

    _quiet_orbax()
    partial = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    private_dir(partial, entry.parent.parent)  # the cache's folders are this user's alone (0700)
    (partial / "model_config.json").write_text(config.to_json())
    tokenizer.save(partial / "tokenizer")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((partial / "params").absolute(), params)
    checkpointer.wait_until_finished()
    (partial / "COMPLETE").write_text("ok\n")
    try:
        os.replace(partial, entry)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(partial, ignore_errors=True)


def _pull_entry(shared: SharedCache, name: str, entry: Path) -> None:
    """A fresh node: the shared cache's entry for this model, verified file by file, moved into
    place whole (COMPLETE comes with it)."""
    partial = entry.with_name(f"{entry.name}.pull{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    private_dir(partial, entry.parent.parent)
    if shared.pull("params", name, None, partial) is not None and (partial / "COMPLETE").is_file():
        with contextlib.suppress(OSError):  # another process put it in place first
            os.replace(partial, entry)
    shutil.rmtree(partial, ignore_errors=True)


def _restore_entry(entry: Path, dtype) -> tuple[ModelConfig, dict, Tokenizer]:
    import orbax.checkpoint as ocp

    _quiet_orbax()
    config = ModelConfig.from_json((entry / "model_config.json").read_text())
    target = param_shapes(config, dtype)
    params = ocp.StandardCheckpointer().restore((entry / "params").absolute(), target)
    return config, params, Tokenizer.load(entry / "tokenizer")


def load_model(
    name_or_path: str | os.PathLike,
    dtype=jnp.float32,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    save_in_background: bool = False,
    shared: SharedCache | None = None,
) -> LoadedModel:
    """Resolve, load (from the orbax cache when possible) and return a model on the host.

    `save_in_background`: after a conversion, write the cache entry on a thread instead of
    before returning (an engine start does not wait for a copy it does not read; the entry
    appears atomically when complete, and the interpreter waits for the write at exit).
    `shared`: a compile cache shared by every node, from which a missing entry is pulled and to
    which a converted one is published."""
    source = resolve_model(name_or_path, cache_dir)
    start = time.perf_counter()
    entry = cache_root(cache_dir) / "params" / f"{source.stem}-{_dtype_name(dtype)}-{cache_key(source, dtype)}"
    shared_name = None
    if use_cache and shared is not None:  # named by content: the local key holds this node's inodes
        shared_name = (
            f"{source.stem}-{_dtype_name(dtype)}-{content_key(source, dtype, entry.name, cache_root(cache_dir))}"
        )
        if not (entry / "COMPLETE").is_file():
            _pull_entry(shared, shared_name, entry)
    if use_cache and (entry / "COMPLETE").is_file():
        try:
            config, params, tokenizer = _restore_entry(entry, dtype)
            seconds = time.perf_counter() - start
            log.info("loaded %s from the parameter cache in %.2fs", source.name, seconds)
            return LoadedModel(config, params, tokenizer, source, True, seconds)
        except Exception as e:  # a damaged entry is rebuilt, never fatal
            log.warning("parameter cache entry %s is unreadable (%s); converting again", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    config, params, tokenizer = _convert(source, dtype)
    if use_cache:

        def save():
            try:
                _save_entry(entry, config, params, tokenizer)
            except OSError as e:
                log.warning("could not write the parameter cache at %s (%s)", entry, e)
                return
            if shared_name is not None:
                names = sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file())
                shared.publish("params", shared_name, None, entry, names)

        if save_in_background:
            threading.Thread(target=save, name="plora-param-cache").start()
        else:
            save()
    seconds = time.perf_counter() - start
    log.info("converted %s in %.2fs", source.name, seconds)
    return LoadedModel(config, params, tokenizer, source, False, seconds)


def load_front_end(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer without its weights (what a gateway in front of
    engine replicas needs to validate and tokenize requests): from the GGUF header or the
    Hugging Face folder's JSON files."""
    source = resolve_model(name_or_path, cache_dir)
    if source.is_file():
        reader = open_gguf(source)
        return config_from_gguf(reader, source), Tokenizer.from_gguf(reader, source)
    return config_from_hf(source), Tokenizer.from_hf_folder(source)


__all__ = ["CheckpointError", "LoadedModel", "load_front_end", "load_model"]
