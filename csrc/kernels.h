// The kernels' interface, shared by the CPU and CUDA backends: one struct of arguments per kernel. Python validates
// every tensor and passes raw pointers, sizes and strides (in elements) as a dict keyed by these field names
// (csrc/bind.h reads it). Plain C++: both g++ and nvcc include it.
#pragma once

#include <cstdint>

namespace aquila {

// Element type codes; aquila/kernels/backend.py passes the same numbers.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct RmsNormForward {
  const void* x;
  int64_t x_row_stride;
  const void* residual;  // null: no residual add
  int64_t residual_row_stride;
  const float* weight;
  void* out;           // rows x hidden, contiguous
  void* residual_out;  // rows x hidden, contiguous: x + residual, written when residual is set
  float* rstd;         // rows: 1 / rms of each normalised row, kept for the backward
  int64_t rows, hidden;
  double eps;
  // Llama's casting: x * rstd rounded to the dtype before the weight multiplies it (then out rounded again); else
  // one rounding of x * rstd * weight.
  bool round_normalized;
  DType dtype;
};

struct RmsNormBackward {
  const void* grad_out;
  int64_t grad_out_row_stride;
  const void* input;  // what the forward normalised: x, or x + residual
  int64_t input_row_stride;
  const float* weight;
  const float* rstd;
  const void* grad_residual;  // null: no gradient flows into the forward's residual output
  int64_t grad_residual_row_stride;
  void* grad_input;  // rows x hidden, contiguous; may be grad_out itself (then with a row stride of hidden)
  float* grad_weight_partials;  // partial_rows x hidden, fp32: each holds the weight gradient of a share of the rows
  int64_t partial_rows;
  int64_t rows, hidden;
  DType dtype;
};

// LayerNorm of each row of x, statistics and arithmetic in fp32, one rounding of the output:
//   mean = sum_j x_j / hidden,   rstd = 1 / sqrt(sum_j (x_j - mean)^2 / hidden + eps),   x_hat = (x - mean) * rstd
//   out = x_hat * weight + bias
// The variance is summed from the deviations (a second pass over the row, from cache), never as E[x^2] - mean^2,
// which cancels when |mean| is large against the spread. mean and rstd are kept per row for the backward, which with
// g = grad_out * weight gives
//   grad_x = rstd * (g - mean_j(g) - x_hat * mean_j(g * x_hat)),
//   grad_weight = sum over rows of grad_out * x_hat,   grad_bias = sum over rows of grad_out.
struct LayerNormForward {
  const void* x;
  int64_t x_row_stride;
  const float* weight;  // hidden: ones for a norm without a learned scale
  const float* bias;    // hidden: zeros for a norm without a bias
  void* out;            // rows x hidden, contiguous
  float* mean;          // rows
  float* rstd;          // rows
  int64_t rows, hidden;
  double eps;
  DType dtype;
};

struct LayerNormBackward {
  const void* grad_out;
  int64_t grad_out_row_stride;
  const void* input;
  int64_t input_row_stride;
  const float* weight;
  const float* mean;
  const float* rstd;
  void* grad_input;             // rows x hidden, contiguous
  float* grad_weight_partials;  // partial_rows x hidden, fp32: each the weight gradient of a share of the rows
  float* grad_bias_partials;    // partial_rows x hidden, fp32: likewise the bias gradient
  int64_t partial_rows;
  int64_t rows, hidden;
  DType dtype;
};

struct Rotary {
  const void* x;
  int64_t x_stride_batch, x_stride_seq, x_stride_head;  // the head_dim stride is 1
  void* out;
  int64_t out_stride_batch, out_stride_seq, out_stride_head;
  const int64_t* positions;  // null: position = offset + index in the sequence
  int64_t positions_stride_batch, positions_stride_seq;
  int64_t offset;
  int64_t batch, seq, heads, head_dim;
  double theta;
  bool interleaved;  // pairs (2i, 2i+1) as in Meta/FlagAI checkpoints; else (i, i + head_dim/2) as in Hugging Face
  bool inverse;      // rotate by -angle: the backward of the forward rotation
  // The caller's cos and sin of each pair (scaled RoPE variants: linear, NTK, YaRN, Llama 3), fp32 [batch or 1, seq,
  // head_dim / 2] with the given strides, used instead of the angles from positions and theta; null: computed.
  const float* cos;
  const float* sin;
  int64_t table_stride_batch, table_stride_seq;
  DType dtype;
};

// A gated linear unit, elementwise over rows x cols of a gate and an up projection (the MLP of LLaMA, Gemma):
//   out = act(gate) * up
// act: SwiGLU's silu(g) = g sigmoid(g), or GeGLU's gelu(g) = g Phi(g), exact (erf) or tanh-approximated. The backward
// recomputes act from the gate, so the forward saves only its inputs:
//   grad_gate = grad_out * up * act'(gate),   grad_up = grad_out * act(gate)
// Arithmetic in fp32, one rounding per output element.
enum class GluActivation : int64_t { silu = 0, gelu = 1, gelu_tanh = 2 };

struct GluForward {
  const void* gate;
  int64_t gate_row_stride;
  const void* up;
  int64_t up_row_stride;
  void* out;  // rows x cols, contiguous
  int64_t rows, cols;
  GluActivation activation;
  DType dtype;
};

struct GluBackward {
  const void* grad_out;
  int64_t grad_out_row_stride;
  const void* gate;
  int64_t gate_row_stride;
  const void* up;
  int64_t up_row_stride;
  void* grad_gate;  // rows x cols, contiguous
  void* grad_up;    // rows x cols, contiguous
  int64_t rows, cols;
  GluActivation activation;
  DType dtype;
};

// Softmax cross-entropy of each row of logits against its target t, with class weights w (all 1 when null; W = sum_j
// w_j), label smoothing eps and z-loss lambda (unweighted), F.cross_entropy(weight=w, label_smoothing=eps) plus
// lambda lse^2:
//   lse = log sum_j exp(z_j),   p_j = exp(z_j - lse)
//   loss = (1 - eps) w_t (lse - z_t) + (eps / vocab) sum_j w_j (lse - z_j) + lambda lse^2
//   grad_j = s (a p_j - (eps / vocab) w_j - (1 - eps) w_t [j == t]) + s_z 2 lambda lse p_j,
//            a = (1 - eps) w_t + eps W / vocab,   (s, s_z) = grad_scale[0], grad_scale[1]
// With softcapping c > 0 (Gemma 2's final logits) every z_j above is c tanh(x_j / c) of the row's logits x, and the
// gradient with respect to x_j is grad_j (1 - tanh^2(x_j / c)). argmax: the index of the first largest z_j.
// A row whose target is ignore_index has loss 0 and gradient 0; a row whose target is out of [0, vocab) otherwise
// has loss NaN and gradient NaN (Python rejects such targets on CPU before the call).
// The CUDA kernel has no softcapping, class weights or argmax: it refuses them.
struct CrossEntropy {
  const void* logits;
  int64_t logits_row_stride;
  const int64_t* targets;       // rows
  const float* class_weights;   // vocab, or null: all 1
  float* loss;                  // rows
  float* lse;                   // rows
  int64_t* argmax;              // rows, or null: not computed
  void* grad;                   // null: loss only. May equal logits: the gradient is then written over them.
  int64_t grad_row_stride;
  // Two fp32 values on the kernel's device: d(reduced loss)/d(row's cross-entropy) s, e.g. 1/n, and d(reduced
  // loss)/d(row's z-loss) s_z (they differ for a mean with class weights).
  const float* grad_scale;
  int64_t rows, vocab, ignore_index;
  double label_smoothing, z_loss;
  double softcap;  // c > 0: logits softcapped to c tanh(x / c); 0: none
  DType dtype;
};

// Scaled dot-product attention over a batch of sequences of possibly different lengths (packed "varlen" form).
// Sequence b's queries are the q_len[b] tokens starting at token q_start[b] of q; its keys and values the k_len[b]
// tokens starting at token k_start[b] of k and v. Element (token t, head h, i) of a tensor is at
// t * token_stride + h * head_stride + i; head_dim is contiguous. Query head h reads key/value head
// h / (heads_q / heads_k) (GQA/MQA).
// Scores s = scale q.k; with softcap c > 0 (Gemma 2) they become c tanh(s / c) before the mask and the softmax, and
// the backward multiplies dS by the slope 1 - tanh^2(s / c).
// Masking is aligned bottom-right, as in flash-attn >= 2.1: query i of a sequence sits at key position
// p = i + k_len - q_len and sees key j only if p - window_left <= j (when window_left >= 0) and j <= p + window_right
// (when window_right >= 0; -1 on either side: unbounded). causal hides the keys after p, as window_right = 0 does
// (with causal set, window_right is ignored). Kernels skip the key blocks that no query of a block sees.
// A query that sees no key gets output 0 and lse -inf (and zero gradients).
// lse: fp32, element (t, h) at t * heads_q + h, t the query token index (as for q).
struct AttentionSequences {
  const int32_t* q_start;  // batch entries each
  const int32_t* q_len;
  const int32_t* k_start;
  const int32_t* k_len;
  int64_t batch, max_q_len, max_k_len;
};

struct StridedTensor {  // a [tokens, heads, head_dim] view
  void* data;
  int64_t token_stride, head_stride;
};

struct AttentionForward {
  StridedTensor q, k, v, out;
  float* lse;  // null: not stored
  AttentionSequences seq;
  int64_t heads_q, heads_k, head_dim;
  double scale;
  bool causal;
  int64_t window_left, window_right;  // -1: unbounded on that side
  float softcap;                      // c > 0: scores softcapped to c tanh(s / c); 0: none
  DType dtype;
  // CUDA split-K decoding only (null and 0 elsewhere): each sequence's keys are cut into `splits` ranges whose
  // partial outputs (fp32, splits x total_q x heads_q x head_dim elements, laid out [total_q][splits][heads_q]
  // [head_dim]) and partial lse (fp32, [total_q][splits][heads_q]) are combined. Unused when splits == 1.
  float* partial_out;
  float* partial_lse;
  int64_t splits;
};

struct AttentionBackward {
  StridedTensor q, k, v, out, grad_out;
  const float* lse;
  StridedTensor grad_q, grad_k, grad_v;  // written whole (zeros where nothing flows)
  float* delta;  // workspace, [total_q, heads_q]: rowsum(grad_out * out)
  AttentionSequences seq;
  int64_t heads_q, heads_k, head_dim;
  double scale;
  bool causal;
  int64_t window_left, window_right;
  float softcap;
  DType dtype;
};

// A linear layer with weight-only quantized weights: out = x W^T (+ bias), W [out_features, in_features] held as
//   bits 8: qweight int8 [out, in], scales fp32 [out]                     W[n][k] = q[n][k] * scales[n]
//   bits 4: qweight uint8 [out, in / 2], column 2j in the low nibble of byte j and 2j + 1 in the high one; scales fp32
//           and zeros uint8 [out, in / group_size] (zeros null: symmetric, every zero 8)
//           W[n][k] = (nibble[n][k] - zeros[n][g]) * scales[n][g],  g = k / group_size
// group_size (4 bits: even, dividing in_features) is ignored for 8 bits. Accumulation in fp32; the output is rounded
// once to the dtype of x.
struct QuantizedLinear {
  const void* x;  // rows x in_features, in dtype
  int64_t x_row_stride;
  const void* qweight;
  const float* scales;
  const uint8_t* zeros;  // null: 8 bits, or symmetric 4 bits
  const float* bias;     // null: no bias; else out_features
  void* out;             // rows x out_features, contiguous, in dtype
  int64_t rows, in_features, out_features, bits, group_size;
  DType dtype;
  // x rounded to int8 first, as DecodeStep's int8_inputs rounds a projection's input (below): in blocks of 32 columns,
  // d = max |x| / 127, x taken as d q. Where the CPU has AVX512-VNNI, from 16 rows, and the blocks fit the weights
  // (in_features a multiple of 32; int4: group_size too) the products run on integers, 16 rows of x at a time: on AMX
  // tiles where the CPU has AMX-INT8 (aquila._C.cpu_amx()), else on vpdpbusd; elsewhere d q feeds the fp32 kernels.
  // For inference: the backward never rounds.
  bool int8_inputs;
};

// The gradient of x through the same weights (held fixed): grad_x = grad_out W.
struct QuantizedLinearBackward {
  const void* grad_out;  // rows x out_features, in dtype
  int64_t grad_out_row_stride;
  const void* qweight;
  const float* scales;
  const uint8_t* zeros;
  void* grad_x;  // rows x in_features, contiguous, in dtype
  int64_t rows, in_features, out_features, bits, group_size;
  DType dtype;
};

// The dense weight of a QuantizedLinear: out[n][k] = W[n][k] as defined above, computed in fp32 (one rounding, as
// the kernels dequantize) and rounded once to dtype (fp32, fp16 or bf16). For a prefill on a CPU whose bf16 matmul is
// native, which then multiplies far faster than the kernels above can dequantize in registers.
struct QuantizedDequantize {
  const void* qweight;
  const float* scales;
  const uint8_t* zeros;
  void* out;  // out_features x in_features, contiguous, in dtype
  int64_t in_features, out_features, bits, group_size;
  DType dtype;
};

// One decoding step of a whole Aquila model, one new token per sequence (CPU). The step has a dtype, fp32 or bf16: that
// of the embeddings, the norms, the cache [batch, max_len, kv_heads, head_dim] and every dense linear weight; the
// activations stay fp32 between the layers. Each linear, as the model holds it ([out, in] row-major), is dense or
// weight-only quantized in QuantizedLinear's format above (int8, or int4 with any even group size dividing in,
// symmetric or not; no bias).
enum class WeightFormat : int64_t { dense = 0, int8 = 1, int4 = 2 };

struct DecodeLinear {
  WeightFormat format;
  const void* weight;    // dense: [out, in] in the step's dtype; int8: int8 [out, in]; int4: uint8 [out, in / 2]
  const float* scales;   // int8: [out]; int4: [out, in / group_size]; dense: null
  const uint8_t* zeros;  // int4 asymmetric: [out, in / group_size]; else null (symmetric int4: every zero 8)
  int64_t group_size;    // int4 only (0 otherwise)
};

struct DecodeLayer {
  const void* attention_norm;
  DecodeLinear wq, wk, wv, wo;
  const void* ffn_norm;
  DecodeLinear w1;  // gate
  DecodeLinear w2;  // down
  DecodeLinear w3;  // up
  void* k_cache;
  void* v_cache;
};

// logits[b] of the token tokens[b] placed at position lengths[b] of sequence b (its filled cache length, which the
// caller then advances). workspace: batch * (3 dim + 2 heads head_dim + 2 kv_heads head_dim + 2 hidden_dim +
// heads * max_len + max(dim, heads head_dim, hidden_dim)) floats (the last: a projection's input copied into the form
// its weights' kernel reads: a quantized one's in the order its dequantized planes come in, a bf16 one's rounded).
// prefetch_bytes: how far ahead of its reads a projection prefetches its weights (0: not at all); the best distance
// depends on the host, so the caller chooses it.
struct DecodeStep {
  int64_t batch, dim, heads, kv_heads, head_dim, hidden_dim, vocab, max_len, n_layers;
  float eps;
  double theta;
  bool interleaved;
  const void* embeddings;
  const void* final_norm;
  DecodeLinear output;
  const DecodeLayer* layers;
  const int64_t* tokens;
  const int32_t* lengths;
  float* logits;
  float* workspace;
  int64_t prefetch_bytes;
  DType dtype;  // of the embeddings, norms, cache and dense weights: f32 or bf16 (activations, logits and workspace
                // are fp32)
  // bf16 steps only: each dense projection takes its input rounded to bf16 (to nearest, ties to even), as a bf16
  // model's matmuls do, and sums the exact products in fp32. On CPUs with AVX512-BF16 those products run on
  // vdpbf16ps, two per lane per instruction, from the weights as they lie in memory: no widening to fp32 (which
  // treats subnormal operands as zero). False: fp32 inputs, each weight widened to fp32.
  bool bf16_inputs;
  // Each weight-only quantized projection takes its input rounded to int8: in blocks of 32 columns from the first
  // (the last may be shorter), d = max |x| / 127 in fp32 and x taken as d q, q = x / d rounded to nearest, ties to
  // even, within +-127 (llama.cpp's Q8_0 activations). On CPUs with AVX512-VNNI the products of q and the weights
  // run on vpdpbusd (int8 rows whose length is a multiple of 64, int4 groups of a multiple of 128); elsewhere d q
  // feeds the fp32 kernels. Dense projections are unaffected. False: fp32 inputs.
  bool int8_inputs;
};

// One projection of the decoding step on its own: out[b * rows + r] = in[b] . weight[r] for the few rows of in (fp32,
// batch x cols), written in fp32: a prompt's last position through the output projection, on the loops, prefetch and
// input rounding (bf16_inputs, int8_inputs, as DecodeStep's) of the steps that follow it. dtype: that of a dense
// weight (f32 or bf16; a quantized weight's buffers have theirs). workspace: batch * cols floats.
struct DecodeProjection {
  DecodeLinear weight;
  const float* in;
  float* out;
  float* workspace;
  int64_t batch, rows, cols;
  int64_t prefetch_bytes;
  DType dtype;
  bool bf16_inputs;
  bool int8_inputs;
};

namespace cpu {
void decode_step(const DecodeStep& args, int threads);
void decode_projection(const DecodeProjection& args, int threads);
void rms_norm_forward(const RmsNormForward& args, int threads);
void rms_norm_backward(const RmsNormBackward& args, int threads);  // partial_rows >= threads
void layer_norm_forward(const LayerNormForward& args, int threads);
void layer_norm_backward(const LayerNormBackward& args, int threads);  // partial_rows >= threads
void rotary(const Rotary& args, int threads);
void glu_forward(const GluForward& args, int threads);
void glu_backward(const GluBackward& args, int threads);
void cross_entropy(const CrossEntropy& args, int threads);
void attention_forward(const AttentionForward& args, int threads);
void attention_backward(const AttentionBackward& args, int threads);
void quantized_linear(const QuantizedLinear& args, int threads);
void quantized_linear_backward(const QuantizedLinearBackward& args, int threads);
void quantized_dequantize(const QuantizedDequantize& args, int threads);
}  // namespace cpu

// Launches on the given cudaStream_t; errors (no driver, bad launch) are thrown as std::runtime_error.
namespace cuda {
void rms_norm_forward(const RmsNormForward& args, uintptr_t stream);
void rms_norm_backward(const RmsNormBackward& args, uintptr_t stream);
void rotary(const Rotary& args, uintptr_t stream);
void cross_entropy(const CrossEntropy& args, uintptr_t stream);
// Split-K ("flash-decoding") attention for a few queries per sequence against a long KV cache.
void decode_attention(const AttentionForward& args, uintptr_t stream);
}  // namespace cuda

}  // namespace aquila
