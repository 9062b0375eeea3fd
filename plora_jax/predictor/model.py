"""The demand forecaster: a 2-layer LSTM (64 hidden units) over a window of per-interval request
counts and times of day, with a learned embedding of the adapter's hashed id, and a dense head
that outputs, after every step, the logit of "at least one request in the next horizon" (P-LoRA's
predictor).

The model carries its LSTM state across calls, so the runtime advances it one step per interval
(see `windows.py` for why). `load_predictor` restores a checkpoint written by
`train_predictor.train` (Orbax, with a `predictor.json` of the window and model settings);
`Predictor.run` is the one jitted, batched call that advances every adapter at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .features import NUM_FEATURES, WindowConfig

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 64
    num_layers: int = 2
    embed_dim: int = 4


class DemandLSTM(nn.Module):
    config: ModelConfig
    num_buckets: int

    def setup(self):
        self.embedding = nn.Embed(self.num_buckets, self.config.embed_dim)
        self.layers = [
            nn.RNN(nn.OptimizedLSTMCell(self.config.hidden), return_carry=True) for _ in range(self.config.num_layers)
        ]
        self.head_hidden = nn.Dense(self.config.hidden)
        self.head_out = nn.Dense(1)

    def __call__(self, features, bucket, carry=None, embedding_scale=None):
        """features [B, T, NUM_FEATURES] (windows.py), bucket [B] i32, carry (per layer, (c, h) [B, hidden])
        or None for a zero state -> (logits [B, T], carry after the last step). `embedding_scale`
        [B] (training only) multiplies each row's embedding (0 drops it)."""
        embedding = self.embedding(bucket)
        if embedding_scale is not None:
            embedding = embedding * embedding_scale[:, None].astype(embedding.dtype)
        x = jnp.concatenate(
            [features, jnp.broadcast_to(embedding[:, None], (*features.shape[:2], embedding.shape[-1]))], axis=-1
        )
        carries = []
        for i, layer in enumerate(self.layers):
            c, x = layer(x, initial_carry=None if carry is None else carry[i])
            carries.append(c)
        h = nn.relu(self.head_hidden(jnp.concatenate([x, features], axis=-1)))
        return self.head_out(h)[..., 0], tuple(carries)


def zero_carry(model_config: ModelConfig, batch: int) -> tuple:
    # Committed to the device like the jitted call's outputs, so that the first call (this carry)
    # and every later one (the previous call's carry) share one executable.
    device = jax.devices()[0]
    zeros = lambda: jax.device_put(np.zeros((batch, model_config.hidden), np.float32), device)
    return tuple((zeros(), zeros()) for _ in range(model_config.num_layers))


def init_params(model: DemandLSTM, seed: int = 0):
    features = jnp.zeros((1, 2, NUM_FEATURES), jnp.float32)
    return model.init(jax.random.PRNGKey(seed), features, jnp.zeros((1,), jnp.int32))["params"]


@dataclass
class Predictor:
    """A restored forecaster: its settings, parameters and the jitted calls."""

    windows: WindowConfig
    model_config: ModelConfig
    params: dict

    def __post_init__(self):
        self.model = DemandLSTM(self.model_config, self.windows.num_buckets)

        def run(params, features, bucket, carry):
            logits, carry = self.model.apply({"params": params}, features, bucket, carry)
            return jax.nn.sigmoid(logits), carry

        self._run = jax.jit(run)

    def run(self, features, bucket, carry=None):
        """(P(>= 1 request in the horizon after each step) [B, T], carry): a whole sequence, or one
        step ([B, 1, NUM_FEATURES]) of the online run when `carry` is the previous call's."""
        if carry is None:
            carry = zero_carry(self.model_config, features.shape[0])
        return self._run(self.params, features, bucket, carry)


def save_settings(directory: Path, windows: WindowConfig, model_config: ModelConfig, extra: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"windows": asdict(windows), "model": asdict(model_config), **(extra or {})}
    (directory / "predictor.json").write_text(json.dumps(payload, indent=1))


def load_predictor(directory: str | Path | None = None) -> Predictor:
    """The predictor saved under `directory` (default: the checkpoint shipped with the package)."""
    import orbax.checkpoint as ocp

    directory = Path(directory) if directory is not None else SHIPPED_CHECKPOINT
    settings_file = directory / "predictor.json"
    if not settings_file.is_file():
        raise FileNotFoundError(f"{settings_file}: missing (not a predictor checkpoint written by train_predictor)")
    settings = json.loads(settings_file.read_text())
    windows = WindowConfig(**settings["windows"])
    model_config = ModelConfig(**settings["model"])
    # An abstract template (no eager init: a start would compile dozens of tiny executables).
    template = jax.eval_shape(lambda: init_params(DemandLSTM(model_config, windows.num_buckets)))
    # The template names the device to restore onto: without one, orbax takes the device saved
    # in the checkpoint's metadata (cpu:0 for the shipped one), which a GPU process does not list.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), template)
    params = ocp.StandardCheckpointer().restore((directory / "params").resolve(), template)
    return Predictor(windows, model_config, params)
