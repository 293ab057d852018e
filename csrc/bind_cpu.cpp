// aquila._C: the CPU kernels.
#include "bind.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "Aquila CPU kernels (C++17, OpenMP). Called through aquila.kernels, which validates the tensors.";
  aquila::bind_kernels<int>(m, "threads", aquila::cpu::rms_norm_forward, aquila::cpu::rms_norm_backward,
                            aquila::cpu::rotary, aquila::cpu::cross_entropy);
}
