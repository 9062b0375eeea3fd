"""An adapter folder's two files, read safely: confined, opened once, read by planned keys only.

A PEFT folder is opened as a directory and its files are opened relative to that handle with
`O_NOFOLLOW`, so a file that is a symlink is refused: nothing outside the folder is read through
one, wherever it points. (The folder itself is confined by whoever names it: the server resolves
a `lora_path`, the scan resolves each subfolder, both against the allowed roots.) Each file is
opened once per read: the config and the safetensors header are parsed from the same handles
the weights are then read from.

What a registration saw is kept as a `FolderIdentity` (device and inode of the folder and of
both files, their sizes, modification and change times: a rewrite in place that restores the
size and modification time still changes the change time). A later read (the transfer thread loading the
adapter again after its host copy was dropped) opens the folder again and refuses it if any of
those changed, so a folder swapped after its check is never read as the registered adapter.

Safetensors are parsed here, not by a library that maps the whole file: the header (an 8-byte
length, then JSON) is bounded, every tensor's byte range must match its dtype and shape and lie
in the file, the data must end where the file does, and only the tensors the caller plans to
use are read, each with one positioned read. Errors are `AdapterError`s naming the file by the
folder's own name (`my-adapter/adapter_model.safetensors`), never by an absolute path.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..limits import MAX_CONFIG_BYTES, MAX_SAFETENSORS_HEADER_BYTES, MAX_TENSOR_DIMS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"


class AdapterError(ValueError):
    """A LoRA adapter that cannot be served; the message names the file and field. `field`:
    which argument of a registration is to blame, "path" (the folder and its files) or "name"."""

    def __init__(self, message: str, field: str = "path"):
        super().__init__(message)
        self.field = field


class AdapterRemoved(AdapterError):
    """The adapter a request asked for was unregistered before it could run."""


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # a dependency of jax

    return {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16),
    }


@dataclass(frozen=True)
class FileIdentity:
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int  # any rewrite in place changes it, even one that restores the size and mtime

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class FolderIdentity:
    """What a registration read: a later read must find the same folder and files."""

    folder: tuple[int, int]  # (device, inode)
    config: FileIdentity
    weights: FileIdentity


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


class AdapterFolder:
    """An open adapter folder (a context manager): `config` at once, then `open_weights` for
    `tensors` (the weights' header) and `read(name)`, so a bad config is named before a missing
    or broken weights file. `open_weights(expect)`: the identity a registration recorded, which
    the files must still have."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = self.path.name or str(self.path)
        self._dir = self._weights = -1
        try:
            self._dir = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # named by the folder's own name: never an absolute path
            raise AdapterError(f"{self.label}: adapter folder not found") from None
        except NotADirectoryError:
            raise AdapterError(f"{self.label}: not a folder") from None
        except OSError as e:
            raise AdapterError(f"{self.label}: cannot be opened ({e.strerror})") from None
        try:
            self._folder_id = (lambda st: (st.st_dev, st.st_ino))(os.fstat(self._dir))
            self.config, self._config_id = self._read_config()
        except BaseException:
            self.close()
            raise

    def open_weights(self, expect: FolderIdentity | None = None) -> None:
        """Open the safetensors file and parse its header (`tensors`); `identity` is then what
        was read. A folder whose identity is not `expect` is refused."""
        self._weights, weights_id = self._open(WEIGHTS_FILE, missing=self._missing_weights)
        self.identity = FolderIdentity(self._folder_id, self._config_id, weights_id)
        if expect is not None and expect != self.identity:
            raise AdapterError(f"{self.label}: the folder changed since the adapter was registered; register it again")
        self.tensors = self._header(weights_id.size)

    # --- files --------------------------------------------------------------------------------
    def _open(self, name: str, missing=None) -> tuple[int, FileIdentity]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir)
        except FileNotFoundError:
            if missing is not None:
                missing()
            raise AdapterError(f"{self.label}/{name}: missing") from None
        except OSError as e:  # ELOOP: a symlink (refused wherever it points); EACCES; ...
            why = "is a symlink (refused: adapter files must lie in their folder)" if _is_link(e) else e.strerror
            raise AdapterError(f"{self.label}/{name}: cannot be opened ({why})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise AdapterError(f"{self.label}/{name}: not a regular file")
        return fd, FileIdentity.of(st)

    def _missing_weights(self) -> None:
        try:
            os.stat(PICKLED_FILE, dir_fd=self._dir, follow_symlinks=False)
        except OSError:
            return
        raise AdapterError(
            f"{self.label}/{PICKLED_FILE}: pickled weights are refused (they can run code); "
            "save the adapter with safetensors (PEFT's default)"
        )

    def _read_config(self) -> tuple[object, FileIdentity]:
        fd, identity = self._open(CONFIG_FILE)
        where = f"{self.label}/{CONFIG_FILE}"
        try:
            if identity.size > MAX_CONFIG_BYTES:
                raise AdapterError(f"{where}: {identity.size} bytes, more than {MAX_CONFIG_BYTES}")
            data = _pread_all(fd, identity.size, 0, where)
        finally:
            os.close(fd)
        try:
            return json.loads(data), identity
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise AdapterError(f"{where}: not valid JSON ({e})") from None

    def _header(self, size: int) -> dict[str, TensorInfo]:
        where = f"{self.label}/{WEIGHTS_FILE}"
        if size < 8:
            raise AdapterError(f"{where}: cannot be read (too short for a safetensors file)")
        length = int.from_bytes(_pread_all(self._weights, 8, 0, where), "little")
        if length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > size:
            raise AdapterError(f"{where}: cannot be read (a header of {length} bytes in a file of {size})")
        try:
            header = json.loads(_pread_all(self._weights, length, 8, where))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise AdapterError(f"{where}: cannot be read (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise AdapterError(f"{where}: cannot be read (its header is not a JSON object)")
        header.pop("__metadata__", None)
        dtypes, data_size, end = _dtypes(), size - 8 - length, 0
        tensors = {}
        for name, spec in header.items():
            info = _tensor_info(spec, dtypes, 8 + length, data_size)
            if info is None:
                raise AdapterError(f"{where}: cannot be read (tensor {shown(name)} has an invalid entry)")
            tensors[name] = info
            end = max(end, info.start + info.nbytes - 8 - length)
        if end != data_size:
            raise AdapterError(f"{where}: cannot be read (its data ends at byte {end}, the file at {data_size})")
        return tensors

    # --- reading --------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """Tensor `name` (one of `tensors`) as a numpy array of its own dtype."""
        info = self.tensors[name]
        where = f"{self.label}/{WEIGHTS_FILE}"
        data = _pread_all(self._weights, info.nbytes, info.start, where)
        return np.frombuffer(data, info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in (self._weights, self._dir):
            if fd >= 0:
                os.close(fd)
        self._weights = self._dir = -1

    def __enter__(self) -> AdapterFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shown(value) -> str:
    """A value as a message shows it: its repr, cut to 80 characters (a file's field or a
    header's key can be a megabyte)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_info(spec, dtypes: dict, data_start: int, data_size: int) -> TensorInfo | None:
    """A header entry checked: a known dtype, a shape of non-negative ints, and a byte range that
    is exactly that shape's size and lies within the data."""
    if not isinstance(spec, dict) or spec.get("dtype") not in dtypes:
        return None
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)
    if (
        not ints(shape)
        or len(shape) > MAX_TENSOR_DIMS
        or any(x < 0 for x in shape)
        or not ints(offsets)
        or len(offsets) != 2
    ):
        return None
    begin, end = offsets
    dtype = dtypes[spec["dtype"]]
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
        return None
    return TensorInfo(dtype, tuple(shape), data_start + begin, end - begin)


def _pread_all(fd: int, size: int, offset: int, where: str) -> bytes:
    parts, done = [], 0
    while done < size:
        try:
            chunk = os.pread(fd, size - done, offset + done)
        except OSError as e:
            raise AdapterError(f"{where}: cannot be read ({e.strerror})") from None
        if not chunk:
            raise AdapterError(f"{where}: cannot be read (it ended at byte {offset + done}, expected {offset + size})")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _is_link(error: OSError) -> bool:
    import errno

    return error.errno in (errno.ELOOP, errno.EMLINK)
