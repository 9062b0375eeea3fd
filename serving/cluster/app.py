"""The Ray Serve application: Gateway -> LoraEngine replicas, with a Forecaster beside them.

```
 clients ──HTTP──> Serve proxy ──> Gateway (serving.app's API, tokenizer, adapter catalog)
                                     │  handle, multiplexed_model_id = adapter id
                                     │  AdapterAffinityRouter: device > host > least loaded, spread hot
                                     v
                  LoraEngine replica 0..N  (one Engine each: paged pool, tiers, LRU on the device)
                        ^          │ record_routing_stats (device, host, queue) -> routers, forecaster
          pre-loads     │          │ ForecastAutoscaler: max(queue target, forecast replicas), 0 after keep-alive
                  Forecaster (LSTM per interval) <── arrivals per adapter from the Gateway
```

`ClusterConfig` holds the deployment's settings (every field is a flag of
`python -m serving.cluster`, as is every `EngineConfig` field for the replicas' engines).
`routing="serve"` deploys the same Gateway and LoraEngine with Serve's defaults instead (its
power-of-two router with multiplex affinity, queue-length autoscaling, no forecaster): the
baseline `benchmarks.cluster` measures against.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from plora_jax.config import EngineConfig
from plora_jax.names import check_name

ROUTINGS = ("plora", "serve")


@dataclass(frozen=True)
class ClusterConfig:
    address: str = "local"  # "local": start Ray on this machine | "auto": join the running cluster | ray://HOST:PORT
    num_cpus: int = 0  # with address=local: CPUs Ray may schedule (0: this machine's)
    host: str = "127.0.0.1"  # the HTTP proxy's address (0.0.0.0 exposes it to the network)
    port: int = 8000
    app_name: str = "plora"
    adapter_dir: tuple[str, ...] = ()  # folders whose subfolders are adapters; load_lora_adapter paths must lie in one
    served_model_name: str = ""  # the base model's name in the API ("": the --model value)
    api_key: str | None = None  # if set, /v1 requires "Authorization: Bearer <key>"
    admin_api_key: str | None = None  # if set, loading and unloading adapters requires this key (not --api-key)
    health_check_period_s: float = (
        10.0  # how often Serve calls each LoraEngine's check_health (a dead engine: replaced)
    )
    max_queue: int = 256  # requests in flight through the gateway beyond which new ones get 429
    routing: str = "plora"  # "plora": affinity router, forecaster, forecast autoscaling | "serve": Serve's defaults
    min_replicas: int = 0  # LoraEngine replicas kept up (0: scale to zero after keep_alive_s)
    max_replicas: int = 2
    initial_replicas: int = 1
    target_ongoing_requests: float = 4.0  # Serve's queue-length autoscaling target per replica
    max_ongoing_requests: int = 32  # requests one replica takes at once (its engine queues beyond max_num_seqs)
    keep_alive_s: float = 300.0  # idle seconds before the last replica stops (downscale_to_zero_delay_s)
    downscale_delay_s: float = 60.0
    upscale_delay_s: float = 5.0
    metrics_interval_s: float = 1.0  # how often replicas and handles push autoscaling metrics
    look_back_period_s: float = 10.0
    replica_cpus: float = 1.0  # Ray CPUs per LoraEngine replica
    replica_gpus: float = 0.0  # Ray GPUs per LoraEngine replica
    replica_policy: str = "lru"  # the replicas' engine policy (the forecaster pre-loads for the cluster)
    max_adapters_per_replica: int = -1  # Serve's multiplex registration cap (-1: the engine's tiers decide)
    spread_queue: int = 8  # a device holder's queue at which its adapter spreads to another replica
    hot_rate: float = 1.0  # requests per second at which the forecaster marks an adapter hot
    forecast_interval_s: float = 60.0  # seconds between forecaster runs
    min_score: float = 0.05  # forecast probability below which nothing is pre-loaded
    report_s: float = 1.0  # seconds between the gateway's reports to the forecaster
    routing_stats_period_s: float = 1.0  # how often replicas report residency to the routers

    def __post_init__(self):
        check_name("routing", self.routing, ROUTINGS)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas >= 1; got {self.min_replicas}, {self.max_replicas}"
            )
        if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas must be in [min_replicas, max_replicas], got {self.initial_replicas}")
        for f in ("forecast_interval_s", "report_s", "routing_stats_period_s", "metrics_interval_s"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")


def engine_options(config: ClusterConfig, engine_config: EngineConfig) -> dict:
    """The replicas' `Engine.from_pretrained` options (everything but the model)."""
    options = dataclasses.asdict(engine_config)
    del options["model"]
    options["policy"] = config.replica_policy
    return options


def build_application(config: ClusterConfig, engine_config: EngineConfig):
    """The bound Serve application (pass it to `serve.run`)."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    from .engine_replica import LoraEngine
    from .forecaster import Forecaster, board_name
    from .gateway import Gateway

    plora = config.routing == "plora"
    options = engine_options(config, engine_config)
    env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "PLORA_CACHE") if k in os.environ}
    actor = {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus, "runtime_env": {"env_vars": env}}
    autoscaling = dict(
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        initial_replicas=config.initial_replicas,
        target_ongoing_requests=config.target_ongoing_requests,
        upscale_delay_s=config.upscale_delay_s,
        downscale_delay_s=config.downscale_delay_s,
        downscale_to_zero_delay_s=config.keep_alive_s,
        metrics_interval_s=config.metrics_interval_s,
        look_back_period_s=config.look_back_period_s,
    )
    router = {"request_routing_stats_period_s": config.routing_stats_period_s}
    if plora:
        autoscaling["policy"] = AutoscalingPolicy(
            policy_function="serving.cluster.forecaster:ForecastAutoscaler",
            policy_kwargs={"board": board_name(config.app_name)},
        )
        router |= {
            "request_router_class": "serving.cluster.router:AdapterAffinityRouter",
            "request_router_kwargs": {"spread_queue": config.spread_queue},
        }
    engine = serve.deployment(
        LoraEngine,
        name="LoraEngine",
        max_ongoing_requests=config.max_ongoing_requests,
        autoscaling_config=AutoscalingConfig(**autoscaling),
        request_router_config=RequestRouterConfig(**router),
        ray_actor_options=actor,
        health_check_period_s=config.health_check_period_s,
    ).bind(engine_config.model, options, config.max_adapters_per_replica, config.app_name if plora else None)
    forecaster = None
    if plora:
        forecaster = serve.deployment(
            Forecaster,
            name="Forecaster",
            num_replicas=1,
            ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
        ).bind(
            engine,
            config.app_name,
            config.forecast_interval_s,
            engine_config.predictor_checkpoint,  # the forecaster's model (the replicas run replica_policy)
            config.min_score,
            engine_config.max_loras,
            config.target_ongoing_requests,
            config.hot_rate,
            config.min_replicas,
            config.max_replicas,
            report_ttl_s=3 * max(1.0, config.routing_stats_period_s),
        )
    gateway = serve.deployment(
        serve.ingress()(Gateway), name="Gateway", num_replicas=1, ray_actor_options={"num_cpus": 0.1}
    ).bind(
        engine,
        forecaster,
        engine_config.model,
        options,
        config.served_model_name,
        config.adapter_dir,
        config.api_key,
        config.max_queue,
        config.report_s,
        config.admin_api_key,
    )
    return gateway


def _coerce(cls, name: str, value):
    """A `serve run` argument (a string from the command line, or a YAML value) as `cls.name`'s type."""
    import typing

    from plora_jax.cli import unwrap_optional

    tp = unwrap_optional(typing.get_type_hints(cls)[name])
    if typing.get_origin(tp) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(typing.get_args(tp)[0](v) for v in items if v != "")
    if tp is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return tp(value) if tp in (int, float, str) and value is not None else value


def app_builder(args: dict):
    """The application for `serve run serving.cluster.app:app_builder model=llama adapter_dir=DIR`
    or a Serve config file's `args`: `ClusterConfig` and `EngineConfig` fields by name (Ray and
    the HTTP proxy are then configured by `serve run`, not by `address`, `host` or `port`)."""
    cluster = {f.name for f in dataclasses.fields(ClusterConfig)}
    engine = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(args) - cluster - engine)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; valid: ClusterConfig and EngineConfig fields")
    config = ClusterConfig(**{k: _coerce(ClusterConfig, k, v) for k, v in args.items() if k in cluster})
    engine_config = EngineConfig(**{k: _coerce(EngineConfig, k, v) for k, v in args.items() if k in engine})
    return build_application(config, engine_config)


def start(config: ClusterConfig, engine_config: EngineConfig, ray_init: dict | None = None, route_prefix: str = "/"):
    """Start (or join) Ray, start Serve's proxy on `config.host:port` and deploy the application;
    returns the Gateway's handle once every deployment is up."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if not ray.is_initialized():
        if config.address == "local":
            kwargs = {"include_dashboard": False} | ({"num_cpus": config.num_cpus} if config.num_cpus else {})
            ray.init(**(kwargs | (ray_init or {})))
        else:
            ray.init(address=config.address, **(ray_init or {}))
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(build_application(config, engine_config), name=config.app_name, route_prefix=route_prefix)
