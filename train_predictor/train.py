"""Train the demand forecaster on Azure Functions traces.

    python -m train_predictor.train --trace CSV [CSV ...] --out DIR [--epochs N --window W --horizon H]

Steps: read every trace (`traces.read_trace`), draw `--sample` functions from each to match the
published popularity distribution (the full-day pool is skewed towards busy functions; 0 keeps
every row), aggregate to `--interval-minutes`, then split by function: `--val-fraction` of the
functions are held out, and validation uses only the last `--val-time-fraction` of their time
(training the first part of the others'), so validation is unseen functions in a later period.

Training: masked binary cross-entropy on every step after the burn-in (`windows.py`), AdamW with a
linear warm-up and cosine decay, gradient clipping, fixed seeds, a tqdm bar, early stopping on the
validation loss. After every epoch the whole train state goes to an Orbax `CheckpointManager`
under DIR/train_state, so a rerun with the same DIR resumes; the best parameters go to
DIR/params with DIR/predictor.json (what `model.load_predictor` and the `predictive` policy
read), and the loss curve to DIR/loss.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plora_jax.predictor.features import WindowConfig
from plora_jax.predictor.model import DemandLSTM, ModelConfig, init_params, save_settings
from plora_jax.predictor.traces import Trace, read_trace, sample_popularity, split_functions

from .windows import Windows


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 16
    batch_size: int = 64
    steps_per_epoch: int = 300  # batches per epoch (windows are drawn from a reshuffled pass)
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    embedding_dropout: float = 0.5  # share of examples trained without their adapter embedding
    patience: int = 3  # epochs without a better validation loss before stopping
    val_batches: int = 40
    seed: int = 0


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


def masked_bce(logits, batch):
    losses = optax.sigmoid_binary_cross_entropy(logits, batch["target"])
    return (losses * batch["mask"]).sum() / jnp.maximum(batch["mask"].sum(), 1.0)


def make_optimizer(config: TrainConfig, total_steps: int):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        min(config.warmup_steps, max(1, total_steps // 2)),
        max(total_steps, 2),
        end_value=config.learning_rate * 0.05,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adamw(schedule, weight_decay=config.weight_decay)
    )


def load_traces(paths, sample: int, interval_minutes: int, seed: int) -> list[Trace]:
    out = []
    for i, path in enumerate(paths):
        trace = read_trace(path)
        if sample:
            trace = sample_popularity(trace, sample, seed=seed + i)
        out.append(trace.aggregate(interval_minutes))
    return out


def split(traces: list[Trace], val_fraction: float, val_time_fraction: float, seed: int):
    """(train traces, validation traces): held-out functions, and a later period for validation."""
    train, val = [], []
    for i, trace in enumerate(traces):
        rest, held = split_functions(trace, val_fraction, seed=seed + i)
        cut = round(trace.num_intervals * (1 - val_time_fraction))
        train.append(rest.time_slice(0, cut))
        val.append(held.time_slice(cut, trace.num_intervals))
    return train, val


class Batches:
    """Endless shuffled batches drawn from several traces' Grain datasets, in proportion to size."""

    def __init__(self, windows: list[Windows], batch_size: int, seed: int):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        sizes = np.array([len(w) for w in windows], np.float64)
        self.weights = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self._iters = [iter(w.dataset(batch_size, seed=seed)) for w in windows]

    def __next__(self) -> dict:
        k = int(self.rng.choice(len(self.windows), p=self.weights))
        try:
            batch = next(self._iters[k])
        except StopIteration:
            self.epoch += 1
            self._iters[k] = iter(self.windows[k].dataset(self.batch_size, seed=self.seed + 1000 * self.epoch))
            batch = next(self._iters[k])
        return batch


def train(
    train_traces: list[Trace],
    val_traces: list[Trace],
    out: Path,
    windows: WindowConfig | None = None,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    metadata: dict | None = None,
) -> History:
    """Train, checkpoint every epoch (resuming from `out` if a checkpoint is there), and write the
    best parameters, settings and loss curve to `out`. Returns the loss history."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    windows, model_config = windows or WindowConfig(), model_config or ModelConfig()
    config = config or TrainConfig()
    out = Path(out).resolve()
    model = DemandLSTM(model_config, windows.num_buckets)
    optimizer = make_optimizer(config, config.epochs * config.steps_per_epoch)
    params = init_params(model, config.seed)
    state = {"params": params, "opt_state": optimizer.init(params), "best_params": params}
    history = History()
    best = float("inf")
    manager = ocp.CheckpointManager(out / "train_state", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start_epoch = 0
    if manager.latest_step() is not None:
        start_epoch = manager.latest_step() + 1
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
        saved = json.loads((out / "history.json").read_text())
        history = History(**saved)
        best = min(history.val_loss) if history.val_loss else best
        print(f"resuming from epoch {start_epoch} (best validation loss {best:.4f})", flush=True)

    @jax.jit
    def train_step(params, opt_state, batch, key):
        # Deployed adapters are never the training functions: their hashed buckets carry other
        # functions' embeddings. Training part of the examples without it keeps the model from
        # leaning on memorised per-function behaviour.
        keep = jax.random.uniform(key, batch["bucket"].shape) >= config.embedding_dropout

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, batch["features"], batch["bucket"], embedding_scale=keep)
            return masked_bce(logits, batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, batch):
        logits, _ = model.apply({"params": params}, batch["features"], batch["bucket"])
        return masked_bce(logits, batch)

    train_windows = [Windows(t, windows) for t in train_traces]
    val_windows = [Windows(t, windows) for t in val_traces]
    batches = Batches(train_windows, config.batch_size, config.seed + start_epoch)
    val_batches = [b for w in val_windows for b in w.dataset(config.batch_size, seed=config.seed)][: config.val_batches]
    params, opt_state = state["params"], state["opt_state"]
    key = jax.random.PRNGKey(config.seed + start_epoch)
    for epoch in range(start_epoch, config.epochs):
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch}", disable=not progress, leave=False)
        losses = []
        for _ in bar:
            key, step_key = jax.random.split(key)
            params, opt_state, loss = train_step(params, opt_state, next(batches), step_key)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        val = float(np.mean([float(eval_step(params, b)) for b in val_batches]))
        history.train_loss.append(float(np.mean(losses)))
        history.val_loss.append(val)
        if val < best:
            best, history.best_epoch = val, epoch
            state["best_params"] = params
        state["params"], state["opt_state"] = params, opt_state
        manager.save(epoch, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        (out / "history.json").write_text(json.dumps(asdict(history)))
        print(f"epoch {epoch}: train loss {history.train_loss[-1]:.4f}, validation loss {val:.4f}", flush=True)
        if epoch - history.best_epoch >= config.patience:
            print(f"early stop: no better validation loss for {config.patience} epochs", flush=True)
            break
    manager.close()
    write_best(out, state["best_params"], windows, model_config, history, metadata)
    return history


def write_best(out: Path, params, windows: WindowConfig, model_config: ModelConfig, history: History, metadata):
    import orbax.checkpoint as ocp

    target = out / "params"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, params, force=True)
    checkpointer.wait_until_finished()
    extra = {"best_epoch": history.best_epoch, "val_loss": min(history.val_loss, default=None), **(metadata or {})}
    save_settings(out, windows, model_config, extra)
    plot_losses(history, out / "loss.png")


def plot_losses(history: History, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss curve (pip install -e '.[train]')", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = range(len(history.train_loss))
    ax.plot(epochs, history.train_loss, marker="o", label="train")
    ax.plot(epochs, history.val_loss, marker="o", label="validation (unseen functions, later period)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked BCE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="+", required=True, help="invocation-count CSV files")
    parser.add_argument("--out", required=True, help="checkpoint folder (resumed if it holds one)")
    parser.add_argument("--sample", type=int, default=2000, help="functions drawn per trace by popularity (0: all)")
    parser.add_argument("--interval-minutes", type=int, default=1)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--val-time-fraction", type=float, default=0.25)
    defaults_w, defaults_m, defaults_t = WindowConfig(), ModelConfig(), TrainConfig()
    for name, value in (*asdict(defaults_w).items(), *asdict(defaults_m).items(), *asdict(defaults_t).items()):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    windows = WindowConfig(**{k: getattr(args, k) for k in asdict(defaults_w)})
    config = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults_t)})
    model_config = ModelConfig(**{k: getattr(args, k) for k in asdict(defaults_m)})
    start = time.perf_counter()
    traces = load_traces(args.trace, args.sample, args.interval_minutes, config.seed)
    train_traces, val_traces = split(traces, args.val_fraction, args.val_time_fraction, config.seed)
    metadata = {
        "traces": [Path(p).name for p in args.trace],
        "sample": args.sample,
        "interval_minutes": args.interval_minutes,
        "command": "python -m train_predictor.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    history = train(
        train_traces, val_traces, Path(args.out), windows, model_config, config, not args.no_progress, metadata
    )
    print(
        f"best validation loss {min(history.val_loss):.4f} at epoch {history.best_epoch}; "
        f"{time.perf_counter() - start:.0f} s; wrote {args.out}/params, predictor.json, loss.png",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
