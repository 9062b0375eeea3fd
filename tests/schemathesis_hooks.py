"""schemathesis hooks for tests/test_server.py: fuzzed completions reach the engine, briefly."""

import zlib

import schemathesis

MAX_FUZZ_TOKENS = 2  # at most this many tokens per generated request: a step or two each
SERVED = ("llama", "lora0", "lora1")  # the test server's base model and two of its adapters


@schemathesis.hook
def before_call(context, case, kwargs):
    """Cap (or set, where omitted: up to the context) the tokens a fuzzed completion may
    generate, and send a non-empty model name as one the server serves (random names only
    reach the 404). Invalid values (negative, not integers, not strings) are left for the
    server to refuse."""
    body = case.body
    if not isinstance(body, dict) or not case.path.endswith("completions"):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS):
            body[name] = MAX_FUZZ_TOKENS
    model = body.get("model")
    if isinstance(model, str) and model:
        body["model"] = SERVED[zlib.crc32(model.encode()) % len(SERVED)]
