// aquila._C: the CPU kernels.
#include <vector>

#include "bind.h"
#include "cpu/common.h"

namespace {

// A linear of the decoding step (or of its projection alone): {"format": WeightFormat's code, "weight", "scales",
// "zeros", "group_size"}.
aquila::DecodeLinear read_decode_linear(aquila::Fields f) {
  const int64_t format = f.i64("format");
  if (format < 0 || format > static_cast<int64_t>(aquila::WeightFormat::int4))
    throw std::invalid_argument(std::string("aquila ") + f.kernel() + ": unknown weight format code " +
                                std::to_string(format));
  aquila::DecodeLinear linear{static_cast<aquila::WeightFormat>(format), f.ptr("weight"), f.ptr<const float>("scales"),
                              f.ptr<const uint8_t>("zeros"), f.i64("group_size")};
  f.done();
  return linear;
}

// The decoding step: the model's sizes and addresses, the layers as a list of dicts. The layers live in a vector the
// step points into, so the step is read and run here rather than through bind_kernel.
aquila::DecodeStep read_decode_step(aquila::Fields& f, std::vector<aquila::DecodeLayer>& layers) {
  for (const auto& item : f.list("layers")) {
    aquila::Fields layer = f.nested(item);
    const auto linear = [&](const char* name) { return read_decode_linear(layer.nested(name)); };
    layers.push_back({layer.ptr("attention_norm"), linear("wq"), linear("wk"), linear("wv"), linear("wo"),
                      layer.ptr("ffn_norm"), linear("w1"), linear("w2"), linear("w3"), layer.ptr("k_cache"),
                      layer.ptr("v_cache")});
    layer.done();
  }
  return {f.i64("batch"), f.i64("dim"), f.i64("heads"), f.i64("kv_heads"), f.i64("head_dim"), f.i64("hidden_dim"),
          f.i64("vocab"), f.i64("max_len"), static_cast<int64_t>(layers.size()), static_cast<float>(f.f64("eps")),
          f.f64("theta"), f.flag("interleaved"), f.ptr("embeddings"), f.ptr("final_norm"),
          read_decode_linear(f.nested("output")), layers.data(), f.ptr<const int64_t>("tokens"),
          f.ptr<const int32_t>("lengths"), f.ptr<float>("logits"), f.ptr<float>("workspace"),
          f.i64("prefetch_bytes"), f.dtype(), f.flag("bf16_inputs"), f.flag("int8_inputs")};
}

}  // namespace

namespace aquila {

// The structs of the CPU-only kernels (LayerNorm, the quantized linear layer), read by bind_kernel as bind.h reads the
// others.
inline LayerNormForward read(Fields& f, LayerNormForward*) {
  return {f.ptr("x"), f.i64("x_row_stride"), f.ptr<float>("weight"), f.ptr<float>("bias"), f.ptr("out"),
          f.ptr<float>("mean"), f.ptr<float>("rstd"), f.i64("rows"), f.i64("hidden"), f.f64("eps"), f.dtype()};
}

inline LayerNormBackward read(Fields& f, LayerNormBackward*) {
  return {f.ptr("grad_out"), f.i64("grad_out_row_stride"), f.ptr("input"), f.i64("input_row_stride"),
          f.ptr<float>("weight"), f.ptr<float>("mean"), f.ptr<float>("rstd"), f.ptr("grad_input"),
          f.ptr<float>("grad_weight_partials"), f.ptr<float>("grad_bias_partials"), f.i64("partial_rows"),
          f.i64("rows"), f.i64("hidden"), f.dtype()};
}

inline DecodeProjection read(Fields& f, DecodeProjection*) {
  return {read_decode_linear(f.nested("weight")), f.ptr<const float>("in"), f.ptr<float>("out"),
          f.ptr<float>("workspace"), f.i64("batch"), f.i64("rows"), f.i64("cols"), f.i64("prefetch_bytes"),
          f.dtype(), f.flag("bf16_inputs"), f.flag("int8_inputs")};
}

inline QuantizedLinear read(Fields& f, QuantizedLinear*) {
  return {f.ptr("x"), f.i64("x_row_stride"), f.ptr("qweight"), f.ptr<const float>("scales"),
          f.ptr<const uint8_t>("zeros"), f.ptr<const float>("bias"), f.ptr("out"), f.i64("rows"),
          f.i64("in_features"), f.i64("out_features"), f.i64("bits"), f.i64("group_size"), f.dtype(),
          f.flag("int8_inputs")};
}

inline QuantizedLinearBackward read(Fields& f, QuantizedLinearBackward*) {
  return {f.ptr("grad_out"), f.i64("grad_out_row_stride"), f.ptr("qweight"), f.ptr<const float>("scales"),
          f.ptr<const uint8_t>("zeros"), f.ptr("grad_x"), f.i64("rows"), f.i64("in_features"),
          f.i64("out_features"), f.i64("bits"), f.i64("group_size"), f.dtype()};
}

inline QuantizedDequantize read(Fields& f, QuantizedDequantize*) {
  return {f.ptr("qweight"), f.ptr<const float>("scales"), f.ptr<const uint8_t>("zeros"), f.ptr("out"),
          f.i64("in_features"), f.i64("out_features"), f.i64("bits"), f.i64("group_size"), f.dtype()};
}

}  // namespace aquila

PYBIND11_MODULE(_C, m) {
  namespace cpu = aquila::cpu;
  m.doc() = "Aquila CPU kernels (C++17, OpenMP). Called through aquila.kernels, which validates the tensors.";
  aquila::bind_kernel(m, "rms_norm_forward", "threads", cpu::rms_norm_forward);
  aquila::bind_kernel(m, "rms_norm_backward", "threads", cpu::rms_norm_backward);
  aquila::bind_kernel(m, "layer_norm_forward", "threads", cpu::layer_norm_forward);
  aquila::bind_kernel(m, "layer_norm_backward", "threads", cpu::layer_norm_backward);
  aquila::bind_kernel(m, "rotary", "threads", cpu::rotary);
  aquila::bind_kernel(m, "glu_forward", "threads", cpu::glu_forward);
  aquila::bind_kernel(m, "glu_backward", "threads", cpu::glu_backward);
  aquila::bind_kernel(m, "cross_entropy", "threads", cpu::cross_entropy);
  aquila::bind_kernel(m, "attention_forward", "threads", cpu::attention_forward);
  aquila::bind_kernel(m, "attention_backward", "threads", cpu::attention_backward);
  aquila::bind_kernel(m, "quantized_linear", "threads", cpu::quantized_linear);
  aquila::bind_kernel(m, "quantized_linear_backward", "threads", cpu::quantized_linear_backward);
  aquila::bind_kernel(m, "quantized_dequantize", "threads", cpu::quantized_dequantize);
  aquila::bind_kernel(m, "decode_projection", "threads", cpu::decode_projection);
  m.def(
      "decode_step",
      [](const pybind11::dict& dict, int threads) {
        std::vector<aquila::DecodeLayer> layers;
        aquila::Fields fields(dict, "decode_step");
        const aquila::DecodeStep args = read_decode_step(fields, layers);
        fields.done();
        pybind11::gil_scoped_release no_gil;
        cpu::decode_step(args, threads);
      },
      pybind11::arg("args"), pybind11::arg("threads"));
  m.def("cpu_amx", &cpu::has_amx_int8,
        "Whether the quantized linear layer's GEMM of int8 inputs (16 rows or more) multiplies on AMX tiles in this "
        "process (the CPU has AMX-INT8, Linux grants the tiles, and AQUILA_CPU_ISA leaves the widest path on); "
        "else on vpdpbusd where cpu_vnni().");
  m.def("cpu_vnni", &cpu::has_vnni,
        "Whether the decoding step's quantized projections with int8 inputs multiply on AVX512-VNNI's vpdpbusd in "
        "this process (the CPU has it and AQUILA_CPU_ISA leaves the AVX-512 path on).");
  m.def(
      "cpu_isa", [] { return cpu::simd_level_name(cpu::simd_level()); },
      "The ISA path the attention and decoding kernels take in this process: avx512_bf16 (x86-64-v4 with "
      "AVX512-BF16: bf16 attention multiplies bf16 operands), avx512 (x86-64-v4), avx2 (x86-64-v3) or baseline, "
      "chosen once from the CPU and capped by AQUILA_CPU_ISA. (The norms, rotary and cross-entropy are "
      "target_clones, whose clone the loader picks from the CPU alone.)");
}
