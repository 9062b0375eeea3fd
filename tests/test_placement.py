"""The placement rules of the Ray Serve application (and of the single-machine serverless
layer), as plain functions: ranking replicas, spreading a hot adapter, the pre-load plan and the
replica count the forecast needs. No Ray here."""

import pytest

from plora_jax.serverless.instances import InstanceLoad, pick_instance
from plora_jax.serverless.placement import (
    ReplicaState,
    hot_adapters,
    prefetch_keep,
    prefetch_plan,
    rank_replicas,
    replicas_needed,
)


def r(rid, device=(), host=(), queue=0):
    return ReplicaState(rid, frozenset(device), frozenset(host), queue)


def test_device_holders_then_host_holders_then_least_loaded():
    replicas = [r("idle", queue=0), r("host", host={"a"}, queue=3), r("dev", device={"a"}, queue=5)]
    assert rank_replicas("a", replicas) == ["dev", "host", "idle"]
    # Within a tier, the least loaded first; ties keep the given order.
    replicas = [r("x", device={"a"}, queue=2), r("y", device={"a"}, queue=1), r("z", device={"a"}, queue=1)]
    assert rank_replicas("a", replicas) == ["y", "z", "x"]
    # The base model (None) goes to the least loaded.
    assert rank_replicas(None, [r("p", queue=4), r("q", queue=1)]) == ["q", "p"]


def test_a_crowded_holder_spreads_its_adapter_to_the_least_loaded_other():
    replicas = [r("holder", device={"a"}, queue=8), r("busy", queue=6), r("free", host={"a"}, queue=1)]
    assert rank_replicas("a", replicas, spread_queue=8) == ["free", "holder", "busy"]
    assert rank_replicas("a", replicas, spread_queue=9)[0] == "holder"  # below the threshold: affinity
    # Nobody less loaded than the holder: no point moving.
    assert rank_replicas("a", [r("h", device={"a"}, queue=8), r("o", queue=8)], spread_queue=4)[0] == "h"
    # Two holders, both crowded: a third replica gets it.
    two = [r("h1", device={"a"}, queue=9), r("h2", device={"a"}, queue=10), r("o", queue=0)]
    assert rank_replicas("a", two, spread_queue=8)[0] == "o"


def test_a_hot_adapter_gets_a_second_replica_then_stays_on_its_two():
    one = [r("h", device={"a"}, queue=0), r("o", queue=3)]
    assert rank_replicas("a", one, hot=True) == ["o", "h"]
    two = [r("h", device={"a"}, queue=0), r("o", device={"a"}, queue=3), r("third", queue=0)]
    assert rank_replicas("a", two, hot=True) == ["h", "o", "third"]
    assert rank_replicas("a", [r("only", device={"a"})], hot=True) == ["only"]  # nowhere to spread


def test_pick_instance_is_the_same_rule():
    loads = [InstanceLoad(0, False, 0, 4), InstanceLoad(1, True, 3, 4), InstanceLoad(2, True, 4, 4)]
    assert pick_instance(loads) == 1  # the holder with room, though busier
    assert pick_instance([InstanceLoad(0, False, 2, 4), InstanceLoad(1, False, 1, 4)]) == 1
    assert pick_instance([InstanceLoad(0, True, 4, 4)]) is None


def test_prefetch_plan_takes_the_likeliest_up_to_the_device_slots():
    forecast = {"a": 0.9, "b": 0.04, "c": 0.5, "d": 0.7, "e": 0.06}
    assert prefetch_plan(forecast, 3) == [("a", False), ("d", False), ("c", False)]
    assert prefetch_plan(forecast, 10, min_score=0.05) == [("a", False), ("d", False), ("c", False), ("e", False)]
    assert prefetch_plan(forecast, 2, hot=frozenset({"d"})) == [("a", False), ("d", True)]
    assert prefetch_plan(forecast, 0) == []


def test_prefetch_plan_into_full_pools_displaces_only_less_likely_adapters():
    forecast = {"a": 0.9, "c": 0.5, "d": 0.7, "e": 0.06}
    # Full (3 slots, 3 resident): "a" and "d" displace the two weakest residents ("x" unrated, "e").
    assert prefetch_plan(forecast, 3, resident=["c", "e", "x"]) == [("a", False), ("d", False), ("c", False)]
    # One slot free: "a" takes it, "d" displaces "e".
    assert prefetch_plan(forecast, 3, resident=["c", "e"]) == [("a", False), ("d", False), ("c", False)]
    # A hot adapter's second copy needs a slot too; with "a" on both devices nothing weaker is left.
    hot = frozenset({"a"})
    assert prefetch_plan(forecast, 2, hot=hot, resident=["a", "a"]) == []
    assert prefetch_plan(forecast, 2, hot=hot, resident=["a", "e"]) == [("a", True)]


def test_a_prefetch_keeps_the_adapters_forecast_at_least_as_likely():
    forecast = {"a": 0.9, "c": 0.5, "d": 0.7, "e": 0.5}
    assert prefetch_keep(forecast, "c") == ("a", "d", "e")  # "e" ties with "c": kept
    assert prefetch_keep(forecast, "a") == ()
    assert prefetch_keep(forecast, "new") == ("a", "c", "d", "e")  # unrated: keeps every rated one


def test_hot_adapters_by_rate():
    assert hot_adapters({"a": 2.0, "b": 0.5, "c": 1.0}, hot_rate=1.0) == {"a", "c"}


def test_replicas_needed_by_littles_law_slots_and_bounds():
    # 6 requests/s x 2 s each = 12 in flight; 4 per replica -> 3.
    assert replicas_needed(6.0, 2.0, 4.0, 0.0, 8, 0, 10) == 3
    # 20 adapters expected active, 8 slots a replica -> 3, though the rate asks for 1.
    assert replicas_needed(1.0, 1.0, 4.0, 20.0, 8, 0, 10) == 3
    # Any expected demand keeps one replica (the pre-warm); none allows zero.
    assert replicas_needed(0.0, 1.0, 4.0, 0.6, 8, 0, 10) == 1
    assert replicas_needed(0.0, 1.0, 4.0, 0.2, 8, 0, 10) == 0
    assert replicas_needed(100.0, 1.0, 4.0, 0.0, 8, 0, 5) == 5  # capped
    assert replicas_needed(0.0, 1.0, 4.0, 0.0, 8, 2, 5) == 2  # floored
    assert replicas_needed(4.0, 1.0, 4.0, 0.0, 8, 0, 9) == 1  # exactly at the target: one, not two
    with pytest.raises(ValueError):
        replicas_needed(-1.0, 1.0, 4.0, 0.0, 8, 0, 1)
    with pytest.raises(ValueError):
        replicas_needed(1.0, 1.0, 0.0, 0.0, 8, 0, 1)
    assert replicas_needed(1e9, 1.0, 1.0, 0.0, 1, 0, 3) == 3  # a huge rate is still capped
