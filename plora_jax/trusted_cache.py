"""Cache folders only this user can write, and cached files loaded only when their MAC matches.

Two of the engine's caches hold code: serialized executables (unpickled, then deserialized by
jax) and the compiled CPU attention kernel (loaded with dlopen). Whoever can write either can
run code as the server, so:

- folders under the cache root are created 0700 (`private_dir`);
- a folder is trusted (`untrusted_reason` is None) only if it and every folder above it up to
  the cache root is owned by this user (or root) and neither group- nor world-writable;
- every cached file is written with an HMAC-SHA256 of its bytes beside it (`<name>.mac`), keyed
  by `<cache root>/cache.key` (32 random bytes, 0600, created on first use), and is loaded only
  if the MAC matches (`Sealer.read`). A truncated, corrupted or foreign file is refused as
  surely as a planted one.

A folder or file that fails is not read: the caller compiles or builds again, with a warning
that says why. (The parameter cache holds arrays, never code: orbax restores them as data.)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import stat
import threading
from pathlib import Path

log = logging.getLogger(__name__)

KEY_FILE = "cache.key"
_lock = threading.Lock()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where every cache of the engine lives: `cache_dir`, else $PLORA_CACHE, else ~/.cache/plora."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PLORA_CACHE") or Path.home() / ".cache" / "plora").expanduser()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def private_dir(path: Path, root: Path) -> Path:
    """Create `path` (below or equal to `root`) and any missing folder up to it, each 0700."""
    path, root = Path(path), Path(root)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
        if folder == root:
            break
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another engine: checked by the caller
            folder.mkdir(mode=0o700)
    return path


def untrusted_reason(path: Path, root: Path) -> str | None:
    """Why `path` (a folder at or below `root`) may hold files another user wrote; None if it
    may not: it and each folder up to `root` owned by this user or root, not group/world-writable."""
    path, root = Path(path), Path(root)
    me = os.geteuid()
    chain = [path, *(p for p in path.parents if p.is_relative_to(root))] if path.is_relative_to(root) else [path]
    for folder in chain:
        try:
            st = os.stat(folder)
        except OSError as e:
            return f"{folder} cannot be checked ({e.strerror})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{folder} is not a folder"
        if st.st_uid not in (me, 0):
            return f"{folder} is owned by another user (uid {st.st_uid})"
        if st.st_mode & 0o022:
            return f"{folder} is writable by its group or by everyone (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _key(root: Path) -> bytes:
    """The cache's MAC key, created (0600) on first use."""
    path = Path(root) / KEY_FILE
    with _lock:
        if not path.exists():
            private_dir(Path(root), Path(root))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(32))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise PermissionError(f"{path}: must be this user's and readable by no one else (mode 600)")
            return os.read(fd, 64)
        finally:
            os.close(fd)


class Sealer:
    """Writes and reads files of one trusted folder with their MACs. `reason` says why the
    folder is not trusted (then nothing is read or written: `usable` is False)."""

    def __init__(self, folder: Path, root: Path):
        self.folder, self.root = Path(folder), Path(root)
        self.reason: str | None = None
        try:
            private_dir(self.folder, self.root)
            self.reason = untrusted_reason(self.folder, self.root)
            self._mac_key = _key(self.root) if self.reason is None else b""
        except OSError as e:
            self.reason = f"{self.folder} cannot be used ({e})"

    @property
    def usable(self) -> bool:
        return self.reason is None

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest().encode()

    def write(self, path: Path, data: bytes) -> None:
        """`data` to `path` (in the folder) and its MAC beside it, each written whole or not at all."""
        _atomic_write(path, data)
        _atomic_write(path.with_name(path.name + ".mac"), self._mac(data))

    def read(self, path: Path) -> tuple[bytes | None, str | None]:
        """(the file's bytes, None) if its MAC matches; (None, why) otherwise."""
        if not self.usable:
            return None, self.reason
        try:
            data = path.read_bytes()
            mac = path.with_name(path.name + ".mac").read_bytes()
        except OSError as e:
            return None, f"cannot be read ({e.strerror})"
        if not hmac.compare_digest(mac, self._mac(data)):
            return None, "its integrity check failed (the file or its MAC was changed)"
        return data, None


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)
