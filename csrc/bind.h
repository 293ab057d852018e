// The Python face of a kernel backend, shared by aquila._C (CPU) and aquila._cuda. Thin on purpose:
// aquila/kernels/backend.py checks every tensor and passes addresses as integers, so no torch header is needed.
// The last argument of each call says how to launch: a thread count on CPU, a cudaStream_t on CUDA.
#pragma once

#include <pybind11/pybind11.h>

#include "kernels.h"

namespace aquila {

namespace py = pybind11;

template <typename T = void>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Attention takes many arguments: they come as a dict whose keys are the struct fields (tensors as
// {"data", "token_stride", "head_stride"} dicts, pointers as integers).
inline StridedTensor strided_from(const py::dict& d) {
  return {as_ptr(d["data"].cast<uintptr_t>()), d["token_stride"].cast<int64_t>(), d["head_stride"].cast<int64_t>()};
}

inline AttentionSequences sequences_from(const py::dict& d) {
  return {as_ptr<const int32_t>(d["q_start"].cast<uintptr_t>()), as_ptr<const int32_t>(d["q_len"].cast<uintptr_t>()),
          as_ptr<const int32_t>(d["k_start"].cast<uintptr_t>()), as_ptr<const int32_t>(d["k_len"].cast<uintptr_t>()),
          d["batch"].cast<int64_t>(), d["max_q_len"].cast<int64_t>(), d["max_k_len"].cast<int64_t>()};
}

inline AttentionForward attention_forward_from(const py::dict& d) {
  return {strided_from(d["q"]), strided_from(d["k"]), strided_from(d["v"]), strided_from(d["out"]),
          as_ptr<float>(d["lse"].cast<uintptr_t>()), sequences_from(d["seq"]), d["heads_q"].cast<int64_t>(),
          d["heads_k"].cast<int64_t>(), d["head_dim"].cast<int64_t>(), d["scale"].cast<double>(),
          d["causal"].cast<bool>(), DType(d["dtype"].cast<int>()),
          as_ptr<float>(d.contains("partial_out") ? d["partial_out"].cast<uintptr_t>() : 0),
          as_ptr<float>(d.contains("partial_lse") ? d["partial_lse"].cast<uintptr_t>() : 0),
          d.contains("splits") ? d["splits"].cast<int64_t>() : 0};
}

inline AttentionBackward attention_backward_from(const py::dict& d) {
  return {strided_from(d["q"]), strided_from(d["k"]), strided_from(d["v"]), strided_from(d["out"]),
          strided_from(d["grad_out"]), as_ptr<const float>(d["lse"].cast<uintptr_t>()), strided_from(d["grad_q"]),
          strided_from(d["grad_k"]), strided_from(d["grad_v"]), as_ptr<float>(d["delta"].cast<uintptr_t>()),
          sequences_from(d["seq"]), d["heads_q"].cast<int64_t>(), d["heads_k"].cast<int64_t>(),
          d["head_dim"].cast<int64_t>(), d["scale"].cast<double>(), d["causal"].cast<bool>(),
          DType(d["dtype"].cast<int>())};
}

template <typename Args, typename Launch>
void bind_dict_kernel(py::module_& m, const char* name, const char* launch_name, Args (*from)(const py::dict&),
                      void (*kernel)(const Args&, Launch)) {
  m.def(
      name,
      [=](const py::dict& d, Launch launch) {
        const Args args = from(d);  // read while holding the GIL
        py::gil_scoped_release no_gil;
        kernel(args, launch);
      },
      py::arg("args"), py::arg(launch_name));
}

template <typename Launch>
void bind_kernels(py::module_& m, const char* launch_name, void (*rms_norm_forward)(const RmsNormForward&, Launch),
                  void (*rms_norm_backward)(const RmsNormBackward&, Launch),
                  void (*rotary)(const Rotary&, Launch),
                  void (*cross_entropy)(const CrossEntropy&, Launch)) {
  auto no_gil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "rms_norm_forward",
      [=](uintptr_t x, int64_t x_row_stride, uintptr_t residual, int64_t residual_row_stride, uintptr_t weight,
          uintptr_t out, uintptr_t residual_out, uintptr_t rstd, int64_t rows, int64_t hidden, double eps, int dtype,
          Launch launch) {
        rms_norm_forward({as_ptr(x), x_row_stride, as_ptr(residual), residual_row_stride, as_ptr<float>(weight),
                          as_ptr(out), as_ptr(residual_out), as_ptr<float>(rstd), rows, hidden, eps, DType(dtype)},
                         launch);
      },
      no_gil, py::arg("x"), py::arg("x_row_stride"), py::arg("residual"), py::arg("residual_row_stride"),
      py::arg("weight"), py::arg("out"), py::arg("residual_out"), py::arg("rstd"), py::arg("rows"), py::arg("hidden"),
      py::arg("eps"), py::arg("dtype"), py::arg(launch_name));

  m.def(
      "rms_norm_backward",
      [=](uintptr_t grad_out, int64_t grad_out_row_stride, uintptr_t input, int64_t input_row_stride, uintptr_t weight,
          uintptr_t rstd, uintptr_t grad_residual, int64_t grad_residual_row_stride, uintptr_t grad_input,
          uintptr_t grad_weight_partials, int64_t partial_rows, int64_t rows, int64_t hidden, int dtype,
          Launch launch) {
        rms_norm_backward({as_ptr(grad_out), grad_out_row_stride, as_ptr(input), input_row_stride,
                           as_ptr<float>(weight), as_ptr<float>(rstd), as_ptr(grad_residual), grad_residual_row_stride,
                           as_ptr(grad_input), as_ptr<float>(grad_weight_partials), partial_rows, rows, hidden,
                           DType(dtype)},
                          launch);
      },
      no_gil, py::arg("grad_out"), py::arg("grad_out_row_stride"), py::arg("input"), py::arg("input_row_stride"),
      py::arg("weight"), py::arg("rstd"), py::arg("grad_residual"), py::arg("grad_residual_row_stride"),
      py::arg("grad_input"), py::arg("grad_weight_partials"), py::arg("partial_rows"), py::arg("rows"),
      py::arg("hidden"), py::arg("dtype"), py::arg(launch_name));

  m.def(
      "rotary",
      [=](uintptr_t x, int64_t x_stride_batch, int64_t x_stride_seq, int64_t x_stride_head, uintptr_t out,
          int64_t out_stride_batch, int64_t out_stride_seq, int64_t out_stride_head, uintptr_t positions,
          int64_t positions_stride_batch, int64_t positions_stride_seq, int64_t offset, int64_t batch, int64_t seq,
          int64_t heads, int64_t head_dim, double theta, bool interleaved, bool inverse, int dtype, Launch launch) {
        rotary({as_ptr(x), x_stride_batch, x_stride_seq, x_stride_head, as_ptr(out), out_stride_batch, out_stride_seq,
                out_stride_head, as_ptr<int64_t>(positions), positions_stride_batch, positions_stride_seq, offset,
                batch, seq, heads, head_dim, theta, interleaved, inverse, DType(dtype)},
               launch);
      },
      no_gil, py::arg("x"), py::arg("x_stride_batch"), py::arg("x_stride_seq"), py::arg("x_stride_head"),
      py::arg("out"), py::arg("out_stride_batch"), py::arg("out_stride_seq"), py::arg("out_stride_head"),
      py::arg("positions"), py::arg("positions_stride_batch"), py::arg("positions_stride_seq"), py::arg("offset"),
      py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_dim"), py::arg("theta"),
      py::arg("interleaved"), py::arg("inverse"), py::arg("dtype"), py::arg(launch_name));

  m.def(
      "cross_entropy",
      [=](uintptr_t logits, int64_t logits_row_stride, uintptr_t targets, uintptr_t loss, uintptr_t lse,
          uintptr_t grad, int64_t grad_row_stride, uintptr_t grad_scale, int64_t rows, int64_t vocab,
          int64_t ignore_index, double label_smoothing, double z_loss, int dtype, Launch launch) {
        cross_entropy({as_ptr(logits), logits_row_stride, as_ptr<int64_t>(targets), as_ptr<float>(loss),
                       as_ptr<float>(lse), as_ptr(grad), grad_row_stride, as_ptr<float>(grad_scale), rows, vocab,
                       ignore_index, label_smoothing, z_loss, DType(dtype)},
                      launch);
      },
      no_gil, py::arg("logits"), py::arg("logits_row_stride"), py::arg("targets"), py::arg("loss"), py::arg("lse"),
      py::arg("grad"), py::arg("grad_row_stride"), py::arg("grad_scale"), py::arg("rows"), py::arg("vocab"),
      py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("dtype"),
      py::arg(launch_name));
}

}  // namespace aquila
