// Paged decode attention for XLA:CPU, as an XLA FFI custom call (see cpu.py).
//
// Semantics: those of reference.ref_decode. Layout: q [batch, num_heads, head_dim] f32 (already
// scaled by head_dim^-0.5), k cache [num_kv_heads, num_blocks, head_dim, block_size] f32 (K
// blocks transposed), v cache [num_kv_heads, num_blocks, block_size, head_dim] f32,
// block_tables [batch, max_blocks] i32, context_lens [batch] i32; out [batch, num_heads, head_dim].
//
// Why a kernel: XLA:CPU runs this op at 3-5 GB/s (it materialises the gathered blocks, then
// runs small batched dots and several reduction passes); reading each block once, straight
// from the paged cache, is what the hardware can do. One work item is one (row, kv head): its
// queries (the grouped query heads) stream over the row's blocks once, with a per-block online
// softmax. Items are handed out through an atomic counter to the calling thread and to tasks
// on XLA's intra-op thread pool; the caller only waits for items already being worked on, so
// it never waits for a task that has not started (no deadlock when the pool is busy).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* tables;
  const int32_t* lens;
  float* out;
  int64_t batch, num_heads, head_dim, num_kv, num_blocks, block_size, max_blocks, window;
};

// exp(x) for x <= 0 in a form the compiler vectorises (no libm call): 2^(x log2 e) split into
// an integer power (exponent bits) and 2^f, f in [-0.5, 0.5], by a degree-6 Taylor polynomial
// (relative error below 1e-7, the float rounding). Inputs below -87 flush to about 1e-38.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504f;
  const float n = __builtin_rintf(t);
  const float f = (t - n) * 0.693147181f;
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

void prefetch_block(const float* block, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(block + i);
}

// One (row, kv head). G, D and BS are compile-time constants so that the score vector of a
// block (BS lanes) and the accumulators (G x D) live in vector registers. K blocks are stored
// transposed, [D][BS]: the scores of a block are then D broadcast-multiply-adds of whole
// vectors, with no horizontal reduction per token.
template <int G, int D, int BS>
void attend_fixed(const Problem& p, int64_t item) {
  const int64_t b = item / p.num_kv, h = item % p.num_kv;
  const float* q = p.q + (b * p.num_heads + h * G) * D;
  float* out = p.out + (b * p.num_heads + h * G) * D;
  // A row never reads past its own table: a length beyond it is clamped to the table's span.
  const int64_t len = std::min<int64_t>(p.lens[b], p.max_blocks * BS);
  if (len <= 0) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, len - p.window) : 0;
  alignas(64) float acc[G][D];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    m[g] = -1e30f;
    l[g] = 0.0f;
    for (int i = 0; i < D; ++i) acc[g][i] = 0.0f;
  }
  const int32_t* table = p.tables + b * p.max_blocks;
  auto block_of = [&](int64_t j) {  // out-of-range table entries read block 0 (reserved), never past the cache
    const int64_t id = table[j];
    return (id < 0 || id >= p.num_blocks) ? int64_t{0} : id;
  };
  const int64_t last = (len - 1) / BS;
  for (int64_t j = first / BS; j <= last; ++j) {
    const int64_t base = (h * p.num_blocks + block_of(j)) * BS * D;
    const float* kb = p.k + base;  // [D][BS]
    const float* vb = p.v + base;  // [BS][D]
    if (j < last) {  // the next block is elsewhere in memory: start fetching it now
      const int64_t next = (h * p.num_blocks + block_of(j + 1)) * BS * D;
      prefetch_block(p.k + next, BS * D);
      prefetch_block(p.v + next, BS * D);
    }
    alignas(64) float s[G][BS];
    for (int g = 0; g < G; ++g)
      for (int t = 0; t < BS; ++t) s[g][t] = 0.0f;
    for (int i = 0; i < D; ++i) {
      const float* kr = kb + i * BS;
      for (int g = 0; g < G; ++g) {
        const float qv = q[g * D + i];
        for (int t = 0; t < BS; ++t) s[g][t] += qv * kr[t];
      }
    }
    const int64_t lo = std::max<int64_t>(first - j * BS, 0), hi = std::min<int64_t>(BS, len - j * BS);
    for (int g = 0; g < G; ++g) {
      float block_max = m[g];
      for (int t = 0; t < BS; ++t) {
        const bool seen = t >= lo && t < hi;
        s[g][t] = seen ? s[g][t] : -1e30f;
        block_max = std::max(block_max, s[g][t]);
      }
      const float correction = exp_nonpositive(m[g] - block_max);
      float sum = 0.0f;
      for (int t = 0; t < BS; ++t) {
        const bool seen = t >= lo && t < hi;
        s[g][t] = seen ? exp_nonpositive(s[g][t] - block_max) : 0.0f;
        sum += s[g][t];
      }
      l[g] = l[g] * correction + sum;
      m[g] = block_max;
      for (int i = 0; i < D; ++i) acc[g][i] *= correction;
    }
    for (int64_t t = lo; t < hi; ++t) {
      const float* vt = vb + t * D;
      for (int g = 0; g < G; ++g) {
        const float w = s[g][t];
        for (int i = 0; i < D; ++i) acc[g][i] += w * vt[i];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.0f / l[g];
    for (int i = 0; i < D; ++i) out[g * D + i] = acc[g][i] * inv;
  }
}

using AttendFn = void (*)(const Problem&, int64_t);

template <int G>
AttendFn pick_dim(int64_t head_dim) {
  switch (head_dim) {
    case 64: return attend_fixed<G, 64, 16>;
    case 128: return attend_fixed<G, 128, 16>;
    default: return nullptr;
  }
}

// The instantiated shapes: block size 16, head_dim 64 or 128, 1-8 query heads per KV head.
AttendFn pick(int64_t group, int64_t head_dim, int64_t block_size) {
  if (block_size != 16) return nullptr;
  switch (group) {
    case 1: return pick_dim<1>(head_dim);
    case 2: return pick_dim<2>(head_dim);
    case 3: return pick_dim<3>(head_dim);
    case 4: return pick_dim<4>(head_dim);
    case 8: return pick_dim<8>(head_dim);
    default: return nullptr;
  }
}

struct Shared {
  Problem problem;
  AttendFn attend;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Shared& shared) {
  int64_t item;
  while ((item = shared.next.fetch_add(1)) < shared.items) {
    shared.attend(shared.problem, item);
    shared.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lens,
                       ffi::ResultBuffer<ffi::F32> out, int64_t window) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = tables.dimensions();
  auto ld = lens.dimensions(), od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || ld.size() != 1 || od.size() != 3) {
    return ffi::Error::InvalidArgument(
        "plora_paged_decode: expected q [B,H,D], k and v caches of rank 4, tables [B,W], lens [B], out [B,H,D]");
  }
  if (kd[0] != vd[0] || kd[1] != vd[1] || kd[2] != vd[3] || kd[3] != vd[2]) {  // K [KV,N,D,BS], V [KV,N,BS,D]
    return ffi::Error::InvalidArgument("plora_paged_decode: the k cache is not the v cache transposed per block");
  }
  if (kd[0] < 1 || kd[1] < 1) return ffi::Error::InvalidArgument("plora_paged_decode: an empty cache");
  if (td[0] != qd[0] || ld[0] != qd[0] || od[0] != qd[0] || od[1] != qd[1] || od[2] != qd[2]) {
    return ffi::Error::InvalidArgument("plora_paged_decode: q, tables, lens and out disagree on the batch");
  }
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), tables.typed_data(), lens.typed_data(),
            out->typed_data(), qd[0], qd[1], qd[2], kd[0], kd[1], v.dimensions()[2], td[1], window};
  AttendFn attend = p.num_heads % p.num_kv ? nullptr : pick(p.num_heads / p.num_kv, p.head_dim, p.block_size);
  if (attend == nullptr || kd[2] != p.head_dim || kd[3] != p.block_size) {
    return ffi::Error::InvalidArgument("plora_paged_decode: unsupported shape (see cpu.supported)");
  }
  auto shared = std::make_shared<Shared>();
  shared->problem = p;
  shared->attend = attend;
  shared->items = p.batch * p.num_kv;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared] { work(*shared); });  // owns `shared`: safe if it starts after we return
  }
  work(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PloraPagedDecode, PagedDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
