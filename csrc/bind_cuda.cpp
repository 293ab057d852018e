// aquila._cuda: the CUDA kernels, compiled by nvcc for sm_80 and sm_90a. Compiled here by the host compiler: it
// sees only kernels.h, never a CUDA header.
#include "bind.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "Aquila CUDA kernels. Called through aquila.kernels, which validates the tensors.";
  aquila::bind_kernels<uintptr_t>(m, "stream", aquila::cuda::rms_norm_forward, aquila::cuda::rms_norm_backward,
                                  aquila::cuda::rotary, aquila::cuda::cross_entropy);
  aquila::bind_dict_kernel<aquila::AttentionForward, uintptr_t>(m, "decode_attention", "stream",
                                                                aquila::attention_forward_from,
                                                                aquila::cuda::decode_attention);
}
