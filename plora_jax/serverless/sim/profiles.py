"""Cost profiles on paper: what a GPU host would charge, for when no GPU is at hand.

No GPU was lent to the project, and every measured profile is a CPU's, where an adapter load
is slow next to a step in a way no GPU host is. A profile here is a `Calibration` computed from
published hardware figures and the model's real shapes (a roofline with efficiency factors),
so the simulator can replay the same workloads at GPU costs. Each number carries its source
below; `docs/serverless.md` lists them too. They are estimates, not measurements: the day a
GPU is lent, `benchmarks/gpu.sh` writes a measured profile from real steps.

How the step terms follow from the figures (bf16 weights, batch of `rows` decode rows):

- decode: every decode launch reads all weights once from HBM (`decode_base_s` = weight bytes
  / (HBM bandwidth x `mem_efficiency`)); each row adds its share of the matmul FLOPs
  (`decode_row_s` = 2 x params / (peak x `compute_efficiency`)) and reads its KV cache
  (`decode_context_token_s` = KV bytes per token / effective bandwidth);
- prefill: 2 x params FLOPs per token at peak x `compute_efficiency` (`prefill_token_s`), plus a
  fixed launch cost (`prefill_base_s`);
- adapters: a decode row reads its adapter's pages (mean rank x bytes per rank / effective
  bandwidth); a prefill token costs the adapter's FLOPs at `lora_efficiency` (gathered LoRA
  kernels run far below peak);
- a page committed into the pool is read and written once on the device; a copy from the host
  runs on the DMA engines, so a transfer in flight adds nothing to a step;
- loads: host to device at the PCIe link's achievable rate with pinned memory, disk to host at
  an NVMe drive's sequential read rate halved for the file system and the safetensors parse;
  from an object store (S3 Standard in the GPU's region), a first-byte latency and the rate of
  the node cache's parallel ranged reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...lora.node_cache import PARALLEL_READS
from .costs import Calibration

# Projection shapes (in, out) per layer, for adapter bytes.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    params: float  # parameters, all of them (embeddings included)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def weight_bytes(self) -> float:
        return 2.0 * self.params  # bf16

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16

    def projection(self, name: str) -> tuple[int, int]:
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[name]

    def bytes_per_rank(self, targets: tuple[str, ...]) -> int:
        """Device bytes of one rank row of an adapter on `targets` (A^T and B rows, bf16)."""
        return self.layers * sum(sum(self.projection(t)) for t in targets) * 2


# Model shapes from the models' config.json on the Hugging Face hub (meta-llama/Llama-2-7b-hf,
# meta-llama/Meta-Llama-3-8B); parameter counts from their model cards (6.74B, 8.03B).
LLAMA2_7B = ModelShape("llama2-7b", 32, 4096, 11008, 32, 32, 32000, 6.74e9)
LLAMA3_8B = ModelShape("llama3-8b", 32, 4096, 14336, 32, 8, 128256, 8.03e9)


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_per_s: float
    bf16_flops: float  # dense peak
    memory_bytes: float
    h2d_bytes_per_s: float  # achievable host-to-device rate over its PCIe link, pinned memory


# NVIDIA A100 80GB SXM datasheet: HBM2e 2,039 GB/s, 312 TFLOPS dense bf16, 80 GB; PCIe 4.0 x16
# is 32 GB/s per direction, about 25 GB/s achieved with pinned memory (NVIDIA's bandwidthTest).
A100_80GB = Device("a100-80gb", 2.039e12, 312e12, 80e9, 25e9)
# NVIDIA H100 SXM datasheet: HBM3 3.35 TB/s, 989 TFLOPS dense bf16, 80 GB; PCIe 5.0 x16 is
# 64 GB/s per direction, about 50 GB/s achieved.
H100_80GB = Device("h100-80gb", 3.35e12, 989e12, 80e9, 50e9)

# A PCIe 4.0 NVMe drive reads about 7 GB/s sequentially (Samsung 980 PRO datasheet); half of
# that is left after the file system and the safetensors parse and page layout.
NVME_BYTES_PER_S = 3.5e9
# Amazon S3 Standard from EC2 in the same region: 100-200 ms first-byte latency and about 85-90
# MB/s per connection (AWS, "Best Practices Design Patterns: Optimizing Amazon S3 Performance",
# 2019). The node cache reads PARALLEL_READS ranges of a file at once.
STORE_LATENCY_S = 0.1
STORE_BYTES_PER_S = PARALLEL_READS * 85e6
MEM_EFFICIENCY = 0.7  # decode kernels reach about 70% of HBM bandwidth (vLLM and TensorRT-LLM reports)
COMPUTE_EFFICIENCY = 0.5  # prefill matmuls reach about half of dense peak (MLPerf-class engines)
LORA_EFFICIENCY = 0.1  # gathered multi-LoRA kernels (SGMV, MBGMM) run about a tenth of peak (Punica, S-LoRA)
STEP_HOST_S = 1e-3  # scheduling and input preparation per step in a Python engine (vLLM's profiles: ~1 ms)
PREFILL_LAUNCH_S = 1e-3  # a prefill launch's fixed cost (kernel launches, attention metadata)
LOAD_BASE_S = 1e-3  # one load's fixed cost: placement, the commit launch
REQUEST_OVERHEAD_S = 1e-3  # HTTP, validation and tokenisation of one request
# vLLM's start with the weights in the page cache: about 10 s to load 15 GB of safetensors and
# 10-20 s of memory profiling and CUDA-graph capture (vLLM's start-up logs, ServerlessLLM, OSDI'24).
INSTANCE_START_S = 25.0


def profile(model: ModelShape, device: Device, targets=ALL_PROJECTIONS, mean_rank: float = 27.0) -> Calibration:
    """The `Calibration` of `model` on `device` (module docstring). `mean_rank` is the mix's mean
    rank (the default mix {8, 12, 16, 24, 40, 64}: 27.3), for the per-row adapter read."""
    hbm = device.hbm_bytes_per_s * MEM_EFFICIENCY
    flops = device.bf16_flops * COMPUTE_EFFICIENCY
    per_rank = model.bytes_per_rank(tuple(targets))
    page_rows = 8
    return Calibration(
        source=f"on paper: {model.name} on {device.name} (plora_jax/serverless/sim/profiles.py)",
        step_base_s=STEP_HOST_S,
        decode_base_s=model.weight_bytes / hbm,
        decode_row_s=2.0 * model.params / flops,
        decode_context_token_s=model.kv_bytes_per_token / hbm,
        prefill_base_s=PREFILL_LAUNCH_S,
        prefill_token_s=2.0 * model.params / flops,
        decode_adapter_row_s=mean_rank * per_rank / hbm,
        prefill_adapter_token_s=2.0 * mean_rank * per_rank / 2 / (device.bf16_flops * LORA_EFFICIENCY),
        transfer_step_s=0.0,
        commit_page_s=2.0 * page_rows * per_rank / hbm,
        request_overhead_s=REQUEST_OVERHEAD_S,
        load_base_s=LOAD_BASE_S,
        h2d_bytes_per_s=device.h2d_bytes_per_s,
        disk_bytes_per_s=NVME_BYTES_PER_S,
        store_latency_s=STORE_LATENCY_S,
        store_bytes_per_s=STORE_BYTES_PER_S,
        instance_start_s=INSTANCE_START_S,
        bytes_per_rank=per_rank,
        kv_bytes_per_token=model.kv_bytes_per_token,
    )


def kv_tokens(model: ModelShape, device: Device, utilisation: float = 0.9) -> int:
    """KV-cache tokens that fit beside the weights (vLLM's default gpu_memory_utilization 0.9)."""
    return int((device.memory_bytes * utilisation - model.weight_bytes) // model.kv_bytes_per_token)


PROFILES = {
    "a100-llama2-7b": (LLAMA2_7B, A100_80GB),
    "h100-llama3-8b": (LLAMA3_8B, H100_80GB),
}


def named(name: str, targets=ALL_PROJECTIONS, mean_rank: float = 27.0) -> tuple[Calibration, int]:
    """A profile by name and the KV blocks (of 16 tokens) its device holds."""
    if name not in PROFILES:
        raise ValueError(f"profile {name!r}: choose from {sorted(PROFILES)}")
    model, device = PROFILES[name]
    return profile(model, device, targets, mean_rank), kv_tokens(model, device) // 16
