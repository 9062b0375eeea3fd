"""The traffic predictor: trace reading and its errors, exact windows and targets, online and
offline features agreeing, training lowering the loss, an Orbax round trip, the online
forecaster matching the offline scorer, the evaluation metrics, and the LSTM beating the simple
predictors on a synthetic mix of always-on, periodic and bursty adapters."""

import json

import numpy as np
import pytest

from plora_jax.predictor.features import (
    COUNT_SCALE,
    HAZARD_SPAN,
    HOUR,
    NEVER,
    NUM_FEATURES,
    OnlineFeatures,
    WindowConfig,
    adapter_bucket,
    time_features,
    trace_features,
    trace_hazard,
)
from plora_jax.predictor.forecaster import LstmForecaster, score_trace
from plora_jax.predictor.model import ModelConfig, Predictor, load_predictor
from plora_jax.predictor.traces import Trace, TraceError, read_trace, sample_popularity, split_functions
from train_predictor.evaluate import (
    evaluate,
    ewma_scores,
    freq_scores,
    hit_rates,
    last_value_scores,
    lru_scores,
    roc_auc,
)
from train_predictor.evaluate import main as evaluate_main
from train_predictor.train import History, TrainConfig, train, write_best
from train_predictor.windows import Windows

HEADER_8H = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(m) for m in range(480, 488))


def write_csv(path, text):
    path.write_text(text)
    return path


def synthetic_trace(num: int, intervals: int, seed: int) -> Trace:
    """Always-on (Poisson 4), periodic (one request every p in 2..30 intervals, random phase) and
    bursty (on/off Markov chain, Poisson 2 while on) adapters, a third of each."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((num, intervals), np.int64)
    kinds = np.arange(num) % 3
    for i in range(num):
        if kinds[i] == 0:
            counts[i] = rng.poisson(4.0, intervals)
        elif kinds[i] == 1:
            period = int(rng.integers(2, 31))
            counts[i, int(rng.integers(period)) :: period] = 1
        else:
            on = False
            for t in range(intervals):
                on = rng.random() < (0.7 if on else 0.03)
                counts[i, t] = rng.poisson(2.0) if on else 0
    ids = tuple(f"synthetic-{seed}-{i}" for i in range(num))
    return Trace(f"synthetic-{seed}", ids, None, counts, first_minute=0)


# --- trace reading ---------------------------------------------------------------------------
def test_read_both_header_styles(tmp_path):
    a = write_csv(tmp_path / "a.csv", HEADER_8H + "\no1,a1,f1,timer,0,1,0,0,2,0,0,0\no2,a2,f2,http,3,3,3,3,3,3,3,3\n")
    trace = read_trace(a)
    assert trace.function_ids == ("f1", "f2") and trace.triggers == ("timer", "http")
    assert trace.first_minute == 479 and trace.counts.shape == (2, 8) and trace.counts[0, 4] == 2
    b = write_csv(tmp_path / "b.csv", "HashFunction,HashOwner,HashApp,minute_1,minute_2,minute_3\nx,x,x,1,0,5\n")
    trace = read_trace(b)
    assert trace.triggers is None and trace.first_minute == 0 and trace.counts.tolist() == [[1, 0, 5]]
    assert trace.aggregate(2).counts.tolist() == [[1]] and trace.time_slice(1, 3).first_minute == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("HashOwner,HashApp,1,2\no,a,1,2\n", "missing column 'HashFunction'"),
        ("HashFunction,HashOwner\nf,o\n", "no per-minute count columns"),
        ("HashFunction,1,2\nf,1,2\ng,1,-3\n", "row 3, column '2': '-3' is not a non-negative whole count"),
        ("HashFunction,1,2\nf,1,x\n", "row 2, column '2': 'x' is not a count"),
        ("HashFunction,1,2\nf,1\n", "row 2 has 2 cells, the header has 3"),
        ("HashFunction,1,3\nf,1,2\n", "not consecutive"),
        ("HashFunction,1,2\n", "no data rows"),
    ],
)
def test_bad_traces_name_file_and_row(tmp_path, text, message):
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert str(path) in str(info.value)


def test_popularity_sampling_and_function_split():
    rng = np.random.default_rng(0)
    totals = np.unique(np.round(np.exp(rng.uniform(0, 14, 3000))))  # one row per distinct total, like the pool
    counts = np.zeros((len(totals), 1440), np.int64)
    counts[:, 0] = totals
    pool = Trace("pool", tuple(f"f{i}" for i in range(len(totals))), None, counts, 0)
    sample = sample_popularity(pool, 2000, seed=1)
    daily = sample.counts.sum(1)
    assert len(set(sample.function_ids)) == 2000  # light rows re-used under distinct ids
    assert 15 <= np.median(daily) <= 90 and np.percentile(daily, 90) < 3000  # reference: p50 37.5, p90 1443
    rest, held = split_functions(sample, 0.2, seed=0)
    assert held.num_functions == 400 and not set(rest.function_ids) & set(held.function_ids)


# --- windows and features --------------------------------------------------------------------
def test_windows_and_targets_are_exact():
    counts = np.array([[0, 2, 0, 0, 1, 0, 0, 0, 3, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    trace = Trace("hand", ("f", "g"), None, counts, first_minute=1439)
    windows = Windows(trace, WindowConfig(window=4, horizon=2, burn_in=1, stride=3, num_buckets=16))
    assert windows.starts.tolist() == [0, 3] and len(windows) == 4
    rows, starts = windows.example_index(np.array([1, 2]))
    assert rows.tolist() == [0, 1] and starts.tolist() == [3, 0]
    batch = windows.batch(np.array([0]), np.array([3]))  # function f, steps observe intervals 3..6
    f = batch["features"][0]
    np.testing.assert_allclose(f[:, 0], np.log1p([0, 1, 0, 0]) / COUNT_SCALE)
    since = np.array([2, 0, 1, 2])  # last request before/at 3, 4, 5, 6: intervals 1, 4, 4, 4
    gap = np.array([NEVER, 3, 3, 3])  # requests at 1 and 4
    np.testing.assert_allclose(f[:, 1], np.log1p(since) / np.log1p(NEVER), rtol=1e-6)
    np.testing.assert_allclose(f[:, 2], np.log1p(gap) / np.log1p(NEVER), rtol=1e-6)
    np.testing.assert_allclose(f[:, 3], np.log1p([2, 3, 3, 3]) / COUNT_SCALE, rtol=1e-6)  # last hour
    # gap hazard: the gap 1 -> 4 (3 intervals) closes at 4; idle 1 and 2 are within one of it
    np.testing.assert_allclose(f[:, 4], [0, 0, 0.5, 0.5])
    np.testing.assert_allclose(f[:, 5:], time_features((1439 + np.arange(4, 8)) % 1440), atol=1e-6)
    # targets: >= 1 request in the 2 intervals after each observed one: [4,5], [5,6], [6,7], [7,8]
    assert batch["target"][0].tolist() == [1, 0, 0, 1] and batch["target_count"][0].tolist() == [1, 0, 0, 3]
    assert batch["mask"][0].tolist() == [0, 1, 1, 1] and batch["bucket"][0] == adapter_bucket("f", 16)
    ds = windows.dataset(3, seed=0)
    assert sum(len(b["target"]) for b in ds) == 4  # Grain: every example once per pass
    with pytest.raises(ValueError, match="too few"):
        Windows(trace, WindowConfig(window=9, horizon=2))


def test_gap_hazard_by_hand():
    timer = np.zeros(11, np.int64)
    timer[[0, 3, 6]] = 1  # period 3; the first request closes no gap
    counts = np.stack([timer, np.zeros(11, np.int64)])
    hazard = trace_hazard(counts)
    # after j: idle s, gaps so far; #(gaps in [s, s+2]) / (1 + #(gaps >= s))
    expected = [0, 0, 0, 0, 1 / 2, 1 / 2, 0, 2 / 3, 2 / 3, 2 / 3, 0]
    np.testing.assert_allclose(hazard[0], expected, rtol=1e-6)
    assert not hazard[1].any()  # never requested
    long_idle = np.zeros((1, HAZARD_SPAN + 5), np.int64)
    long_idle[0, [0, 1, 2]] = 1  # gaps of 1; an idle run past the span has no estimate
    assert trace_hazard(long_idle)[0, HAZARD_SPAN - 1 :].tolist() == [0.0] * 6


def test_online_features_equal_the_offline_ones():
    rng = np.random.default_rng(0)
    counts = (rng.random((12, 3 * HOUR)) < 0.15) * rng.integers(1, 9, (12, 3 * HOUR))
    counts[0] = 0
    online = OnlineFeatures()
    stepped = np.stack([online.step(counts[:, t]) for t in range(counts.shape[1])], axis=1)
    np.testing.assert_array_equal(stepped, trace_features(counts))


# --- metrics ---------------------------------------------------------------------------------
def test_baselines_and_metrics_on_a_hand_made_trace():
    counts = np.array([[1, 0, 0, 2], [0, 3, 0, 0], [0, 0, 0, 1]])
    trace = Trace("hand", ("a", "b", "c"), None, counts, 0)
    assert last_value_scores(trace)[:, 3].tolist() == [0, 0, 0]
    assert lru_scores(trace)[:, 3].tolist() == [0, 1, -1]  # last request before interval 3
    assert freq_scores(trace)[:, 2].tolist() == [1, 3, 0]
    np.testing.assert_allclose(ewma_scores(trace, 0.5)[0], [0, 0.5, 0.25, 0.125])
    # interval 3 with budget 1/3 (one resident): lru keeps b (cold: a and c) -> 0 of 2 activations
    assert hit_rates(lru_scores(trace), counts, 1 / 3, 3) == {"activation_hit_rate": 0.0, "request_hit_rate": 0.0}
    assert hit_rates(counts.astype(float), counts, 1 / 3, 3)["activation_hit_rate"] == 0.5
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5


# --- training, checkpoints, online use -------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("predictor")
    train_trace = synthetic_trace(90, 600, seed=0)
    val_trace = synthetic_trace(30, 600, seed=7)
    config = TrainConfig(epochs=3, steps_per_epoch=100, batch_size=64, learning_rate=5e-3, warmup_steps=20, patience=10)
    windows = WindowConfig(window=64, stride=16, burn_in=8, num_buckets=64)
    history = train([train_trace], [val_trace], out, windows, ModelConfig(), config, progress=False)
    return out, history


def test_training_lowers_the_loss_and_resumes(trained):
    out, history = trained
    assert history.train_loss[-1] < 0.8 * history.train_loss[0]
    assert history.val_loss[-1] < history.val_loss[0]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "predictor.json").is_file()
    saved = json.loads((out / "history.json").read_text())
    assert saved["train_loss"] == history.train_loss
    # A rerun on the same folder resumes after the last epoch: nothing left to train.
    again = train(
        [synthetic_trace(90, 600, seed=0)],
        [synthetic_trace(30, 600, seed=7)],
        out,
        WindowConfig(window=64, stride=16, burn_in=8, num_buckets=64),
        ModelConfig(),
        TrainConfig(epochs=3, steps_per_epoch=100, patience=10),
        progress=False,
    )
    assert again.train_loss == history.train_loss


def test_orbax_round_trip_gives_identical_predictions(trained, tmp_path):
    out, _ = trained
    predictor = load_predictor(out)
    trace = synthetic_trace(15, 120, seed=3)
    copy = tmp_path / "copy"
    write_best(copy, predictor.params, predictor.windows, predictor.model_config, History([1.0], [1.0], 0), {})
    restored = load_predictor(copy)
    np.testing.assert_array_equal(score_trace(restored, trace), score_trace(predictor, trace))
    with pytest.raises(FileNotFoundError, match=r"predictor\.json"):
        load_predictor(tmp_path / "nothing")


def test_a_checkpoint_saved_on_another_device_loads_here(tmp_path):
    """The shipped checkpoint was saved on a CPU; a GPU process lists no cpu:0. Its saved sharding
    is rewritten to name a device this process lacks: restoring must not depend on it."""
    import shutil

    from plora_jax.predictor.model import SHIPPED_CHECKPOINT

    copy = tmp_path / "checkpoint"
    shutil.copytree(SHIPPED_CHECKPOINT, copy)
    sharding_file = copy / "params" / "_sharding"
    text = sharding_file.read_text()
    assert "cpu:0" in text
    sharding_file.write_text(text.replace("cpu:0", "cuda:7"))
    restored = load_predictor(copy)
    trace = synthetic_trace(15, 120, seed=3)
    np.testing.assert_array_equal(score_trace(restored, trace), score_trace(load_predictor(), trace))


def test_online_forecaster_matches_the_offline_scores(trained):
    predictor = load_predictor(trained[0])
    trace = synthetic_trace(70, 40, seed=5)  # 70 adapters: the forecaster's rows grow past 64
    offline = score_trace(predictor, trace)
    clock = {"minute": 0.0}
    forecaster = LstmForecaster(predictor, minute_of_day=lambda: clock["minute"])
    names = trace.function_ids
    for t in range(trace.num_intervals - 1):
        clock["minute"] = float(trace.minute_of_day(t + 1))
        # every adapter reports from the start (absent ones count as zero requests)
        forecaster.update({n: int(c) for n, c in zip(names, trace.counts[:, t], strict=True)})
        probs = forecaster.predict()
        np.testing.assert_allclose([probs[n] for n in names], offline[:, t + 1], atol=2e-5)


def test_lstm_beats_simple_predictors_on_a_synthetic_mix(trained):
    predictor = load_predictor(trained[0])
    trace = synthetic_trace(120, 400, seed=11)  # unseen adapters
    results = evaluate(trace, [0.4], predictor, predictors=("lstm", "last_value", "ewma", "freq", "oracle"))
    rates = {k: v["activation_hit_rate"] for k, v in results["budgets"]["0.4"].items()}
    for baseline in ("last_value", "ewma", "freq"):
        assert rates["lstm"] > rates[baseline] + 0.04, rates
    assert rates["oracle"] >= rates["lstm"]


def test_evaluate_cli_writes_json_and_plot(trained, tmp_path):
    rows = [f"o{i},a{i},f{i},timer," + ",".join(str(int(m % (i + 2) == 0)) for m in range(120)) for i in range(8)]
    header = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(m) for m in range(480, 600))
    path = write_csv(tmp_path / "trace.csv", header + "\n" + "\n".join(rows) + "\n")
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ["--trace", str(path), "--checkpoint", str(trained[0]), "--budgets", "0.25,0.5"]
    code = evaluate_main([*args, "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0 and out_png.stat().st_size > 1000
    results = json.loads(out_json.read_text())
    assert set(results["budgets"]) == {"0.25", "0.5"}
    names = {"lstm", "last_value", "ewma", "lru", "freq", "histogram", "oracle"}
    assert set(results["budgets"]["0.5"]) == names
    assert set(results["budgets"]["0.5"]["lstm"]) == {"activation_hit_rate", "request_hit_rate", "roc_auc"}
    with pytest.raises(SystemExit):
        evaluate_main(["--trace", str(path), "--budgets", "0.2,2"])


@pytest.mark.slow  # compiles a warm-up plan or many executables
def test_predictor_runs_a_batch_in_one_call():
    predictor = Predictor(WindowConfig(num_buckets=8), ModelConfig(), None)
    from plora_jax.predictor.model import init_params

    predictor.params = init_params(predictor.model)
    probs, carry = predictor.run(np.zeros((5, 3, NUM_FEATURES), np.float32), np.zeros((5,), np.int32))
    assert probs.shape == (5, 3) and len(carry) == 2 and carry[0][0].shape == (5, 64)


def test_the_runtime_never_imports_the_training_package():
    """The engine, the policies (the LSTM forecaster included) and the serverless layer run without
    `train_predictor`: a fresh interpreter that imports all of them has not loaded it."""
    import subprocess
    import sys

    code = (
        "import sys, plora_jax\n"
        "from plora_jax import Engine\n"
        "import plora_jax.engine.core, plora_jax.policies, plora_jax.policies.predictive\n"
        "import plora_jax.serverless.workload, plora_jax.serverless.sim, plora_jax.serverless.live\n"
        "import plora_jax.predictor.forecaster, serving.app\n"
        "from plora_jax.policies.predictive import make_forecaster\n"
        "make_forecaster('')\n"
        "bad = sorted(m for m in sys.modules if m.startswith('train_predictor'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
