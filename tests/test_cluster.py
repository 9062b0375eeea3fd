"""P-LoRA on Ray Serve, on a real local Ray cluster (one start for the whole module): tiny
engines with random weights, two LoraEngine replicas behind the gateway, driven through Serve's
HTTP proxy with the official `openai` client. A second application scales to zero.

Waits are on explicit conditions with deadlines (a replica's report reaching the forecaster, a
deployment's replica count), never sleeps that hope another process has acted."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers import write_tiny_gguf  # noqa: E402

from plora_jax import Engine  # noqa: E402
from plora_jax.config import EngineConfig  # noqa: E402
from plora_jax.lora.peft import save_random_adapter  # noqa: E402

pytestmark = pytest.mark.slow  # a real local Ray cluster

PROMPT = "the cat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 90.0, every: float = 0.2):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from serving.app import ServerState, build_app
    from serving.cluster import ClusterConfig, start
    from serving.sources import AdapterSources

    root = tmp_path_factory.mktemp("cluster")
    model_config, _ = write_tiny_gguf(root / "tiny.gguf")
    adapters = root / "adapters"
    for i in range(6):
        save_random_adapter(adapters / f"lora{i}", model_config, 8 * (1 + i % 2), ("q_proj", "v_proj"), seed=i)
    engine_config = EngineConfig(
        model=str(root / "tiny.gguf"),
        dtype="float32",
        warmup=False,
        max_model_len=1024,
        num_kv_blocks=300,
        max_num_seqs=4,
        max_loras=3,
        lora_pool_pages=24,
        cache_dir=str(root / "cache"),
    )
    for name in ("REPLICA", "HANDLE"):
        os.environ[f"RAY_SERVE_{name}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    port = free_port()
    common = dict(
        port=port,
        num_cpus=8,
        adapter_dir=(str(adapters),),
        served_model_name="tiny",
        replica_cpus=0.5,
        forecast_interval_s=3600.0,  # the tests run the forecaster's intervals themselves (step)
        report_s=3600.0,
        routing_stats_period_s=0.5,
        health_check_period_s=1.0,  # a replica whose engine died is replaced within seconds
    )
    started = time.perf_counter()
    main = ClusterConfig(min_replicas=2, max_replicas=2, initial_replicas=2, spread_queue=2, **common)
    start(main, engine_config, ray_init={"object_store_memory": 256 * 2**20, "log_to_driver": False})
    zero = ClusterConfig(
        app_name="zero",
        min_replicas=0,
        max_replicas=1,
        initial_replicas=1,
        keep_alive_s=2.0,
        downscale_delay_s=1.0,
        upscale_delay_s=0.0,
        look_back_period_s=1.0,
        metrics_interval_s=0.5,
        **common,
    )
    # Its forecaster is the EWMA one: its forecast decays to nothing in a known number of intervals.
    start(zero, dataclasses.replace(engine_config, predictor_checkpoint="ewma"), route_prefix="/zero")
    startup_s = time.perf_counter() - started

    # The single-engine server over the same model and adapters: the reference.
    options = {k: v for k, v in engine_config.__dict__.items() if k != "model"} | {"policy": "lru"}
    local = Engine.from_pretrained(engine_config.model, **options)
    local.add_adapter_dir(adapters)
    single_port = free_port()
    state = ServerState(local, "tiny", AdapterSources.of([str(adapters)]), None, max_queue=64)
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=single_port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the single-engine server")
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{port}",
        single_url=f"http://127.0.0.1:{single_port}",
        adapters=adapters,
        serve=serve,
        forecaster=serve.get_deployment_handle("Forecaster", "plora"),
        engine=serve.get_deployment_handle("LoraEngine", "plora"),
        startup_s=startup_s,
        model=engine_config.model,
        cache_dir=engine_config.cache_dir,
    )
    server.should_exit = True
    thread.join(30)
    local.close()
    serve.shutdown()
    ray.shutdown()


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def residency(cluster) -> dict:
    """Each replica's last report (adapters on its device and host, queue, cold starts, hits)."""
    return cluster.forecaster.describe.remote().result()["residency"]


def reports_after(cluster, condition, what):
    """Wait until both replicas' reports satisfy `condition(reports)`; return the reports."""
    return wait_for(lambda: (lambda rep: rep if len(rep) == 2 and condition(rep) else None)(residency(cluster)), what)


def complete(url, model, max_tokens=8, **kwargs):
    out = client(url).completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, **kwargs)
    return out.choices[0].text


@pytest.mark.parametrize("model", ["tiny", "lora0", "lora1"])
def test_same_greedy_text_as_the_single_engine_server(cluster, model):
    assert complete(cluster.url, model, 12) == complete(cluster.single_url, model, 12)
    messages = [{"role": "user", "content": "hi"}]
    chat = [
        client(url).chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        for url in (cluster.url, cluster.single_url)
    ]
    assert chat[0].choices[0].message.content == chat[1].choices[0].message.content
    stream = client(cluster.url).completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == complete(cluster.single_url, model, 12)
    listed = {m.id for m in client(cluster.url).models.list().data}
    assert listed == {"tiny", *(f"lora{i}" for i in range(6))}


def test_affinity_keeps_an_adapter_on_the_replica_that_holds_it(cluster):
    complete(cluster.url, "lora2")
    reports = reports_after(cluster, lambda rep: any("lora2" in r["device"] for r in rep.values()), "lora2 placed")
    holders = [rid for rid, r in reports.items() if "lora2" in r["device"]]
    assert len(holders) == 1
    (holder,) = holders
    hits = reports[holder]["device_hits"]
    for _ in range(4):
        complete(cluster.url, "lora2")
    reports = reports_after(cluster, lambda rep: rep[holder]["device_hits"] >= hits + 4, "the holder's hits")
    assert [rid for rid, r in reports.items() if "lora2" in r["device"] or "lora2" in r["host"]] == [holder]


def test_a_hot_adapter_spreads_to_a_second_replica(cluster):
    """Three long streams for one adapter, each started once the previous one streams: when its
    holder runs `spread_queue` (2) of them, the router sends the third to the other replica,
    which loads the adapter and serves it (the same greedy text)."""
    streams = []
    for _ in range(3):
        chunks = iter(
            client(cluster.url).completions.create(
                model="lora3",
                prompt=PROMPT,
                max_tokens=300,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        streams.append([next(chunks).choices[0].text, chunks])  # streaming: routed and running
    texts = [first + "".join(c.choices[0].text for c in rest) for first, rest in streams]
    assert len(set(texts)) == 1 and texts[0]
    reports = reports_after(
        cluster, lambda rep: all("lora3" in r["host"] for r in rep.values()), "lora3 on both replicas"
    )
    assert all("lora3" in r["host"] for r in reports.values())


def test_a_forecaster_pre_load_makes_the_first_request_a_device_hit(cluster):
    """The forecaster, told of past demand for lora4 (as the gateway's reports would), pre-loads
    it onto a replica in its next interval; the first request then finds it on the device."""
    path = str((cluster.adapters / "lora4").resolve())
    cluster.forecaster.observe.remote({"lora4": 5}, {"lora4": path}, []).result()
    published = cluster.forecaster.step.remote().result()
    assert "lora4" in published["plan"]
    placed = [p for p in published["prefetched"] if p.get("adapter") == "lora4"]
    assert placed and placed[0]["residency"] in ("loading", "device")
    holder = placed[0]["replica"]
    reports = reports_after(cluster, lambda rep: "lora4" in rep[holder]["device"], "lora4 pre-loaded")
    # The report reaches the gateway's routers through Serve's controller, a little later.
    gateway = cluster.serve.get_app_handle("plora")

    def gateway_sees_it():
        views = gateway.routing_view.remote().result()
        return any("lora4" in v["replicas"].get(holder, {}).get("device", ()) for v in views)

    wait_for(gateway_sees_it, "the gateway's router to see lora4 at its holder")
    cold = reports[holder]["cold_starts"]
    hits = reports[holder]["device_hits"]
    complete(cluster.url, "lora4")
    reports = reports_after(cluster, lambda rep: rep[holder]["device_hits"] > hits, "the request at the holder")
    assert reports[holder]["cold_starts"] == cold


def test_scale_to_zero_then_a_forecast_pre_warms_and_a_request_completes(cluster):
    serve = cluster.serve

    def engine_replicas():
        return sum(serve.status().applications["zero"].deployments["LoraEngine"].replica_states.values())

    url = cluster.url + "/zero"
    assert complete(url, "lora0") == complete(cluster.single_url, "lora0")
    wait_for(lambda: engine_replicas() == 0, "scale to zero after the keep-alive", timeout=120)
    # A forecast of demand starts a replica and pre-loads the adapter before the request.
    forecaster = serve.get_deployment_handle("Forecaster", "zero")
    path = str((cluster.adapters / "lora5").resolve())
    forecaster.observe.remote({"lora5": 3}, {"lora5": path}, []).result()
    published = forecaster.step.remote().result()
    assert published["replicas"] == 1 and any(p.get("adapter") == "lora5" for p in published["prefetched"])
    assert engine_replicas() == 1

    def zero_reports():
        return forecaster.describe.remote().result()["residency"]

    (replica,) = wait_for(lambda: [r for r, s in zero_reports().items() if "lora5" in s["device"]], "lora5 pre-warmed")
    assert complete(url, "lora5") == complete(cluster.single_url, "lora5")
    served = wait_for(lambda: (lambda s: s if s["device_hits"] else None)(zero_reports()[replica]), "lora5's hit")
    assert served["cold_starts"] == 0  # the pre-warmed replica had lora5 before its first request
    # Empty intervals until the forecast expects nothing (the EWMA decays by 0.7 an interval);
    # then, with no traffic, zero again after the keep-alive; the next request starts one.
    for _ in range(30):
        published = forecaster.step.remote().result()
        if published["replicas"] == 0 and not published["plan"]:
            break
    assert published["replicas"] == 0 and not published["plan"]
    wait_for(lambda: engine_replicas() == 0, "scale to zero again", timeout=180)
    assert complete(url, "tiny") == complete(cluster.single_url, "tiny")


def test_a_killed_replica_ends_its_stream_with_an_error_and_later_requests_succeed(cluster):
    complete(cluster.url, "lora1")
    reports_after(cluster, lambda rep: all(r["queue"] == 0 for r in rep.values()), "both replicas idle")
    stream = client(cluster.url).completions.create(
        model="lora1", prompt=PROMPT, max_tokens=500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    # The one replica with a request running is the one serving this stream.
    reports = reports_after(cluster, lambda rep: sum(r["queue"] > 0 for r in rep.values()) == 1, "the stream's replica")
    (pid,) = [r["pid"] for r in reports.values() if r["queue"] > 0]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="replica"):
        for _ in chunks:
            pass
    for model in ("tiny", "lora1", "lora0"):
        assert complete(cluster.url, model) == complete(cluster.single_url, model)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model": "nope", "prompt": "x"}',
        b'{"model": "tiny", "prompt": "x", "max_tokens": -1}',
        b'{"model": "tiny", "prompt": "x", "temperature": "hot"}',
        b'{"model": "lora0", "prompt": ""}',
        b'{"model": "tiny"}',
    ],
)
def test_bad_input_gets_the_same_error_json_as_the_single_engine_server(cluster, body):
    answers = [
        httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
        for url in (cluster.url, cluster.single_url)
    ]
    assert answers[0].status_code == answers[1].status_code >= 400
    assert answers[0].json() == answers[1].json()


def test_the_cluster_benchmark_runs_both_arms_on_the_same_requests(cluster, tmp_path):
    from benchmarks import cluster as bench

    out = tmp_path / "cluster.json"
    argv = ["--model", cluster.model, "--cache-dir", cluster.cache_dir, "--adapters", "8", "--minutes", "2"]
    argv += ["--start-minute", "300", "--seconds-per-minute", "3", "--max-replicas", "1", "--keep-alive-s", "5"]
    result = bench.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text())["arms"].keys() == {"plora", "serve"}
    for arm in result["arms"].values():
        assert arm["requests"] == result["requests"] > 0 and arm["completed"] + arm["lost"] == arm["requests"]
        assert arm["lost"] == 0 and arm["failures"] == {} and arm["ttft_mean_s"] > 0
        # A replica was up through the replay, and each adapter's first request was cold somewhere.
        assert arm["replica_s"] > 0 and 1 <= arm["cold_starts"] <= arm["completed"]
    assert result["arms"]["serve"]["baseline_cold_median_s"] is not None


def _kill_engine(replica_actor) -> str:
    """Run inside a LoraEngine replica (through Ray's `__ray_call__`): its engine's loop dies of
    a fault, as of a device error, while the process lives on."""

    class InjectedFault(BaseException):
        pass

    engine = replica_actor._replica_impl._user_callable_wrapper._callable.engine
    with contextlib.suppress(InjectedFault):
        engine.core.call(lambda: (_ for _ in ()).throw(InjectedFault("injected device fault")))
    engine.core.died.wait(60)  # the call's caller hears first; the loop then fails what it held
    return engine.readiness()["status"]


def test_a_replica_whose_engine_dies_is_reported_unhealthy_and_replaced(cluster):
    """Its check_health raises, so Serve replaces it; meanwhile it reports itself unusable, so
    routers rank it last; afterwards every model is served as by the single engine."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    reports = reports_after(cluster, lambda rep: True, "both replicas")
    victim = sorted(reports)[0]
    actor = ray.get_actor(f"SERVE_REPLICA::plora#LoraEngine#{victim}", namespace="serve")
    assert ray.get(actor.__ray_call__.remote(_kill_engine)) == "failed"
    unusable = lambda rep: rep.get(victim, {}).get("queue", 0) >= 1_000_000 or victim not in rep
    wait_for(lambda: unusable(residency(cluster)), "the dead replica to report itself unusable")
    replaced = lambda rep: victim not in rep and len(rep) == 2
    wait_for(lambda: replaced(residency(cluster)), "Serve to replace it", timeout=240)
    for model in ("tiny", "lora0"):
        assert complete(cluster.url, model) == complete(cluster.single_url, model)


def test_the_gateway_health_reflects_the_replicas(cluster, monkeypatch):
    """Read from Serve's controller: ok while the LoraEngine deployment is healthy (or scaling),
    failed while it is unhealthy."""
    from types import SimpleNamespace as NS

    from ray import serve

    from serving.cluster.gateway import ClusterEngine

    assert httpx.get(cluster.url + "/health", timeout=30).json()["status"] == "ok"
    gateway_engine = ClusterEngine(None, cluster.model, {"cache_dir": cluster.cache_dir}, app_name="plora")
    assert gateway_engine.replica_health()["status"] == "ok"  # the live controller
    unhealthy = NS(status="UNHEALTHY", message="replica failed its health check")  # Serve's status is a str enum
    monkeypatch.setattr(serve, "status", lambda: NS(applications={"plora": NS(deployments={"LoraEngine": unhealthy})}))
    health = gateway_engine.replica_health()
    assert health["status"] == "failed" and "UNHEALTHY" in health["detail"]
    assert "health check" not in health["detail"]  # Serve's message (a traceback, paths) goes to the log only


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_leaks_no_gateway_counter(cluster, stream):
    """A client that disconnects (a stream before its first chunk, a plain request on a short
    timeout): the gateway's admitted count and its queue return to 0 (a stream that never
    started used to hold one forever), and the replicas go idle."""
    body = {"model": "lora2", "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": stream}
    http = httpx.Client(base_url=cluster.url, timeout=0.5)
    with contextlib.suppress(httpx.TimeoutException), http, http.stream("POST", "/v1/completions", json=body):
        pass  # leave at once
    gauge = lambda text, name: float(re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M)[1])

    def settled():
        text = httpx.get(cluster.url + "/metrics", timeout=30).text
        return gauge(text, "plora_api_in_flight") == 0 and gauge(text, "plora_queue_depth") == 0

    wait_for(settled, "the gateway's counters back to 0", timeout=60)
    reports_after(cluster, lambda rep: all(r["queue"] == 0 for r in rep.values()), "the replicas idle")
