// aquila._cuda: the CUDA kernels, compiled by nvcc for sm_80 and sm_90a. Compiled here by the host compiler: it
// sees only kernels.h, never a CUDA header.
#include "bind.h"

PYBIND11_MODULE(_cuda, m) {
  namespace cuda = aquila::cuda;
  m.doc() = "Aquila CUDA kernels. Called through aquila.kernels, which validates the tensors.";
  aquila::bind_kernel(m, "rms_norm_forward", "stream", cuda::rms_norm_forward);
  aquila::bind_kernel(m, "rms_norm_backward", "stream", cuda::rms_norm_backward);
  aquila::bind_kernel(m, "rotary", "stream", cuda::rotary);
  aquila::bind_kernel(m, "cross_entropy", "stream", cuda::cross_entropy);
  aquila::bind_kernel(m, "decode_attention", "stream", cuda::decode_attention);
}
