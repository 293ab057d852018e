// aquila._C: the CPU kernels.
#include <vector>

#include "bind.h"

namespace {

// The decoding step's arguments: sizes and addresses in a dict, the layers as a list of dicts of addresses.
aquila::DecodeStep decode_step_from(const pybind11::dict& d, std::vector<aquila::DecodeLayer>& layers) {
  using aquila::as_ptr;
  for (const auto& item : d["layers"]) {
    const auto layer = item.cast<pybind11::dict>();
    auto weight = [&](const char* name) { return as_ptr<const float>(layer[name].cast<uintptr_t>()); };
    layers.push_back({weight("attention_norm"), weight("wq"), weight("wk"), weight("wv"), weight("wo"),
                      weight("ffn_norm"), weight("w1"), weight("w2"), weight("w3"),
                      as_ptr<float>(layer["k_cache"].cast<uintptr_t>()),
                      as_ptr<float>(layer["v_cache"].cast<uintptr_t>())});
  }
  auto size = [&](const char* name) { return d[name].cast<int64_t>(); };
  return {size("batch"), size("dim"), size("heads"), size("kv_heads"), size("head_dim"), size("hidden_dim"),
          size("vocab"), size("max_len"), static_cast<int64_t>(layers.size()), d["eps"].cast<float>(),
          d["theta"].cast<double>(), d["interleaved"].cast<bool>(),
          as_ptr<const float>(d["embeddings"].cast<uintptr_t>()), as_ptr<const float>(d["final_norm"].cast<uintptr_t>()),
          as_ptr<const float>(d["output"].cast<uintptr_t>()), layers.data(),
          as_ptr<const int64_t>(d["tokens"].cast<uintptr_t>()), as_ptr<const int32_t>(d["lengths"].cast<uintptr_t>()),
          as_ptr<float>(d["logits"].cast<uintptr_t>()), as_ptr<float>(d["workspace"].cast<uintptr_t>())};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Aquila CPU kernels (C++17, OpenMP). Called through aquila.kernels, which validates the tensors.";
  aquila::bind_kernels<int>(m, "threads", aquila::cpu::rms_norm_forward, aquila::cpu::rms_norm_backward,
                            aquila::cpu::rotary, aquila::cpu::cross_entropy);
  aquila::bind_dict_kernel<aquila::AttentionForward, int>(m, "attention_forward", "threads",
                                                          aquila::attention_forward_from,
                                                          aquila::cpu::attention_forward);
  aquila::bind_dict_kernel<aquila::AttentionBackward, int>(m, "attention_backward", "threads",
                                                           aquila::attention_backward_from,
                                                           aquila::cpu::attention_backward);
  m.def(
      "decode_step",
      [](const pybind11::dict& d, int threads) {
        std::vector<aquila::DecodeLayer> layers;
        const aquila::DecodeStep args = decode_step_from(d, layers);
        pybind11::gil_scoped_release no_gil;
        aquila::cpu::decode_step(args, threads);
      },
      pybind11::arg("args"), pybind11::arg("threads"));
}
