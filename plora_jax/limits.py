"""Every bound on what a request or an adapter file may ask for, defined once.

The HTTP schema (`serving.schema`), `SamplingParams`, the input processor and the adapter reader
all read these names, so a value the server accepts is one the engine can hold: nothing a
caller sends can overflow a device integer on the loop thread, make a response grow without
limit, or make a file read cost more than its size. Bounds that depend on the model (token ids
below the vocabulary, prompts within the context) are checked against the model by
`InputProcessor`; the fixed ones are here.
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1  # the device's step counters, token ids and top-k are int32

# --- sampling -----------------------------------------------------------------------------------
MAX_TOKENS = INT32_MAX  # max_tokens (the context is the real limit; this keeps it an int32)
MAX_TOP_K = INT32_MAX  # top_k beyond the vocabulary means "all" (clamped per request)
SEED_BOUND = 2**32  # seeds are uint32: [0, SEED_BOUND)
MAX_TOP_LOGPROBS = 20  # the likeliest tokens a step reports per row (OpenAI's chat limit)
MIN_TEMPERATURE = 1e-5  # below: greedy (dividing logits by a denormal overflows; vLLM's rule)
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # frequency and presence penalties lie in [-MAX_PENALTY, MAX_PENALTY]
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # outside: logits overflow or vanish
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_STOP_CHARS = 512  # characters of one stop string (each token re-searches that much text)
MAX_STOP_TOKEN_IDS = 64

# --- one request --------------------------------------------------------------------------------
MAX_PROMPTS = 64  # prompts in one completions request
MAX_N = 16  # samples of each prompt
MAX_MESSAGES = 4096  # chat messages in one request
MAX_NAME_CHARS = 256  # model, adapter and participant names
MAX_USER_CHARS = 1024  # OpenAI's `user` field (accepted, ignored)
# Log-probability entries one request may return: over its choices, (echoed prompt tokens +
# tokens it may generate) x (1 + top_logprobs). Each entry is a few hundred bytes of Python
# objects and JSON, so this keeps the largest answer to a few hundred MB. An lm-evaluation-
# harness batch (64 prompts of 2,048 tokens, logprobs 1) needs 262,144.
MAX_LOGPROB_ENTRIES = 2**19
# Requests being rendered and tokenized (before admission) at once; past it, 429. Tokenizing a
# text the context could hold takes up to about a second here, so a flood of long prompts
# queues here, not in front of admitted work.
MAX_TOKENIZING = 64
# Adapters being fetched from a store on first use at once (`--adapter-source`); past it, 429.
# Each holds a thread of the resolver's pool while the store answers.
MAX_RESOLVING = 8
NOT_FOUND_TTL_S = 10.0  # a name the store did not hold answers 404 without asking again for this long

# --- adapters -----------------------------------------------------------------------------------
MAX_ADAPTERS = 100_000  # adapters registered at once in one engine or gateway
MAX_REPLICA_ADAPTERS = 4096  # adapters a cluster replica keeps registered (least recently requested out)
MAX_RANK = 1 << 16  # r and rank_pattern values (an engine's max_lora_rank is usually far lower)
MAX_PATH_CHARS = 4096  # lora_path (PATH_MAX)
MAX_LORA_ALPHA = 65536.0  # lora_alpha and alpha_pattern values lie in (0, MAX_LORA_ALPHA]
# Largest |A| and |scaling * B| element: trained LoRA weights are below 1 and scalings below
# 100, so this refuses only weights made to overflow a matmul, never a real fine-tune.
MAX_LORA_WEIGHT = 1e4
MAX_PATTERNS = 4096  # rank_pattern / alpha_pattern entries
MAX_PATTERN_CHARS = 256  # characters of one pattern key
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20  # a safetensors file's JSON header
MAX_TENSOR_DIMS = 8  # dimensions of one tensor in a safetensors header
