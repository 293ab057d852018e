// aquila._C: the CPU kernels.
#include "bind.h"

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
}
