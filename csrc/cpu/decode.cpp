// A whole decoding step of the model in one call (CPU, fp32): embeddings, every block (RMSNorm with the residual
// add, q/k/v projections, rotary, the cache write, attention over the cache, output projection, SwiGLU) and the
// output projection, inside one OpenMP team. A decoding step at batch 1 reads every weight once and does little else,
// so what it costs beyond the weight reads is overhead: here that is a barrier per stage instead of a Python call,
// a tensor allocation and a dispatch per op.
#include <cmath>
#include <vector>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

// out[b * out_stride + r] = in[b] . w[r] for the rows r, split over the team (each thread streams its own rows).
AQUILA_INLINE void project(const float* __restrict w, int64_t rows, int64_t cols, const float* __restrict in,
                           int64_t in_stride, float* __restrict out, int64_t out_stride, int64_t batch) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    for (int64_t b = 0; b < batch; ++b) {
      const float* x = in + b * in_stride;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < cols; ++j) acc += row[j] * x[j];
      out[b * out_stride + r] = acc;
    }
  }
}

// normed = (residual (+)= x) / rms * weight, over one token's features.
AQUILA_INLINE void add_and_norm(const float* __restrict x, float* __restrict residual, float* __restrict normed,
                                const float* __restrict weight, int64_t dim, float eps, bool first) {
  if (first) {
    for (int64_t j = 0; j < dim; ++j) residual[j] = x[j];
  } else {
    for (int64_t j = 0; j < dim; ++j) residual[j] += x[j];
  }
  const double sum = sum_over(dim, [&](int64_t j) { return residual[j] * residual[j]; });
  const float inverse = 1.0f / std::sqrt(static_cast<float>(sum / dim) + eps);
  for (int64_t j = 0; j < dim; ++j) normed[j] = residual[j] * inverse * weight[j];
}

AQUILA_INLINE void rotate(float* __restrict x, const float* __restrict c, const float* __restrict s, int64_t half,
                          bool interleaved) {
  const int64_t stride = interleaved ? 2 : 1, partner = interleaved ? 1 : half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i * stride], x2 = x[i * stride + partner];
    x[i * stride] = x1 * c[i] - x2 * s[i];
    x[i * stride + partner] = x2 * c[i] + x1 * s[i];
  }
}

AQUILA_SIMD_CLONES void decode_kernel(const DecodeStep& a, int threads) {
  const int64_t B = a.batch, dim = a.dim, H = a.heads, KV = a.kv_heads, D = a.head_dim, F = a.hidden_dim;
  const int64_t half = D / 2, group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(a.theta, -2.0 * i / D);
  // cos/sin of each sequence's position, in double from the exact angle as the rotary kernel does.
  std::vector<float> cos_sin(B * 2 * half);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(a.lengths[b]) * inv_freq[i];
      cos_sin[(b * 2) * half + i] = static_cast<float>(std::cos(angle));
      cos_sin[(b * 2 + 1) * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  float* x = a.workspace;  // [B, dim]: the input of the next stage (embedding, block output)
  float* residual = x + B * dim;
  float* normed = residual + B * dim;
  float* q = normed + B * dim;  // [B, H * D]
  float* k = q + B * H * D;     // [B, KV * D]
  float* v = k + B * KV * D;
  float* attended = v + B * KV * D;  // [B, H * D]
  float* gate = attended + B * H * D;  // [B, F]
  float* up = gate + B * F;
  float* scores = up + B * F;  // [B * H, max_len]

#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* row = a.embeddings + a.tokens[b] * dim;
      for (int64_t j = 0; j < dim; ++j) x[b * dim + j] = row[j];
    }
    for (int64_t l = 0; l < a.n_layers; ++l) {
      const DecodeLayer& w = a.layers[l];
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b)
        add_and_norm(x + b * dim, residual + b * dim, normed + b * dim, w.attention_norm, dim, a.eps, l == 0);
      project(w.wq, H * D, dim, normed, dim, q, H * D, B);
      project(w.wk, KV * D, dim, normed, dim, k, KV * D, B);
      project(w.wv, KV * D, dim, normed, dim, v, KV * D, B);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        const float* c = &cos_sin[(b * 2) * half];
        const float* s = &cos_sin[(b * 2 + 1) * half];
        for (int64_t h = 0; h < H; ++h) rotate(q + (b * H + h) * D, c, s, half, a.interleaved);
        const int64_t slot = (b * a.max_len + a.lengths[b]) * KV * D;
        for (int64_t h = 0; h < KV; ++h) {
          rotate(k + (b * KV + h) * D, c, s, half, a.interleaved);
          for (int64_t d = 0; d < D; ++d) {
            w.k_cache[slot + h * D + d] = k[(b * KV + h) * D + d];
            w.v_cache[slot + h * D + d] = v[(b * KV + h) * D + d];
          }
        }
      }
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, kv_head = (bh % H) / group, keys = a.lengths[b] + 1;
        const float* query = q + bh * D;
        float* p = scores + bh * a.max_len;
        const float* k_rows = w.k_cache + (b * a.max_len * KV + kv_head) * D;
        const float* v_rows = w.v_cache + (b * a.max_len * KV + kv_head) * D;
        float best = -__builtin_inff();
        for (int64_t j = 0; j < keys; ++j) {
          const float* key = k_rows + j * KV * D;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += query[d] * key[d];
          p[j] = dot * scale;
          best = p[j] > best ? p[j] : best;
        }
        double total = 0.0;
        for (int64_t j = 0; j < keys; ++j) {
          p[j] = exp_nonpositive(p[j] - best);
          total += p[j];
        }
        float* out = attended + bh * D;
        for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
        for (int64_t j = 0; j < keys; ++j) {
          const float* value = v_rows + j * KV * D;
          const float weight = static_cast<float>(p[j] / total);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) out[d] += weight * value[d];
        }
      }
      project(w.wo, dim, H * D, attended, H * D, x, dim, B);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b)
        add_and_norm(x + b * dim, residual + b * dim, normed + b * dim, w.ffn_norm, dim, a.eps, false);
      project(w.w1, F, dim, normed, dim, gate, F, B);
      project(w.w3, F, dim, normed, dim, up, F, B);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * F; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      project(w.w2, dim, F, gate, F, x, dim, B);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      add_and_norm(x + b * dim, residual + b * dim, normed + b * dim, a.final_norm, dim, a.eps, a.n_layers == 0);
    project(a.output, a.vocab, dim, normed, dim, a.logits, a.vocab, B);
  }
}

}  // namespace

void decode_step(const DecodeStep& args, int threads) { decode_kernel(args, threads); }

}  // namespace aquila::cpu
