"""The host-only scheduler: budgets, packing rules, block growth, preemption order."""

from plora_jax.engine.sampling import SamplingParams
from plora_jax.engine.scheduler import Request, Scheduler, Status


def make(num_kv_blocks=64, max_num_seqs=4, budget=32, max_prefill_seqs=2) -> Scheduler:
    return Scheduler(num_kv_blocks, 4, max_num_seqs, budget, max_prefill_seqs)


def request(n_prompt: int, max_tokens: int = 8, name: str = "r") -> Request:
    return Request(
        name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), 0, frozenset(), n_prompt + max_tokens
    )


def read(req: Request, token: int = 7) -> None:
    """What the engine does when a sampled token comes back."""
    req.pending -= 1
    req.output_ids.append(token)


def test_long_prompt_is_chunked_to_the_budget():
    s = make()
    r = request(70)
    s.add(r)
    sizes = []
    while not r.prefilled:
        plan = s.schedule()
        sizes.append(len(plan.prefill[0].token_ids))
    assert sizes == [32, 32, 6] and r.num_computed == 70 and r.pending == 1
    assert len(r.blocks) == 18  # ceil(70 / 4): blocks grow with the computed tokens, not ahead


def test_decode_runs_every_step_and_prefill_takes_the_rest():
    s = make(budget=32)
    a, b = request(4, name="a"), request(40, name="b")
    s.add(a)
    s.schedule()  # a prefilled
    s.add(b)
    plan = s.schedule()
    assert [row.request for row in plan.decode] == [a]
    assert plan.prefill[0].request is b and len(plan.prefill[0].token_ids) == 31  # 32 - one decode token
    assert plan.decode[0].position == 4 and plan.decode[0].step == 1


def test_a_continuing_chunk_goes_first_and_first_chunks_pack_after_it():
    s = make(budget=32, max_prefill_seqs=2)
    long, short1, short2 = request(40, name="long"), request(5, name="s1"), request(6, name="s2")
    s.add(long)
    s.schedule()  # long takes the whole budget
    s.add(short1)
    s.add(short2)
    plan = s.schedule()
    assert [(row.request.request_id, row.start, len(row.token_ids)) for row in plan.prefill] == [
        ("long", 32, 8),
        ("s1", 0, 5),
    ]  # at most max_prefill_seqs segments
    plan = s.schedule()
    assert [row.request.request_id for row in plan.prefill] == ["s2"]


def test_segments_fill_the_token_budget_and_the_last_is_chunked():
    s = make(budget=32, max_prefill_seqs=4)
    a, b, c = request(20, name="a"), request(20, name="b"), request(3, name="c")
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    assert [(row.request.request_id, len(row.token_ids), row.final) for row in plan.prefill] == [
        ("a", 20, True),
        ("b", 12, False),
    ]
    plan = s.schedule()  # b continues first (it alone may read earlier keys), c packs after it
    assert [(row.request.request_id, row.start, len(row.token_ids)) for row in plan.prefill] == [
        ("b", 12, 8),
        ("c", 0, 3),
    ]
    assert [row.request.request_id for row in plan.decode] == ["a"]


def test_preemption_takes_the_newest_and_recomputes_its_tokens():
    s = make(num_kv_blocks=9, budget=64)  # 8 usable blocks of 4 tokens
    old, new = request(16, max_tokens=20, name="old"), request(16, max_tokens=20, name="new")
    s.add(old)
    s.add(new)
    s.schedule()  # both prefilled: 4 blocks each, pool empty
    for r in (old, new):
        read(r)
    plan = s.schedule()  # old needs a 5th block for position 16 -> new is preempted
    assert [row.request for row in plan.decode] == [old]
    assert new.status is Status.WAITING and new.num_computed == 0 and not new.blocks and new.num_preemptions == 1
    assert s.waiting[0] is new
    read(old)
    s.finish(old, "stop")
    plan = s.schedule()
    assert plan.prefill[0].request is new and plan.prefill[0].token_ids == [*new.prompt_ids, 7]
    assert plan.prefill[0].step == 1  # the sampling index continues where it left off


def test_requests_at_their_limit_are_not_decoded_again():
    s = make()
    r = request(5, max_tokens=1)
    s.add(r)
    s.schedule()
    assert r.at_limit and s.schedule() is None  # its only token is in flight
    read(r)
    s.finish(r, "length")
    assert not s.has_work() and s.blocks.num_used == 0


def test_finish_releases_slots_for_new_admissions():
    s = make(max_num_seqs=1)
    a, b = request(3, name="a"), request(3, name="b")
    s.add(a)
    s.add(b)
    s.schedule()
    assert b.status is Status.WAITING  # no free seq_slot
    read(a)
    s.finish(a, "stop")
    assert s.schedule().prefill[0].request is b and b.seq_slot == 0
