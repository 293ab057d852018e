// The Python face of a kernel backend, shared by aquila._C (CPU) and aquila._cuda, with one convention for every
// kernel: `kernel(args, launch)`, where args is a dict whose keys are the fields of the kernel's struct in kernels.h
// (pointers as integer addresses, a [tokens, heads, head_dim] view as {"data", "token_stride", "head_stride"}) and
// launch says how to launch: a thread count on CPU, a cudaStream_t on CUDA. aquila/kernels/backend.py checks every
// tensor and builds the dict, so no torch header is needed here. A missing or unknown key is a KeyError naming it.
#pragma once

#include <pybind11/pybind11.h>

#include <set>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace aquila {

namespace py = pybind11;

// Reads a struct's fields from a dict by name, and refuses the keys no field took (a misspelt optional field would
// otherwise pass as a null pointer).
class Fields {
 public:
  Fields(const py::dict& dict, const char* kernel) : dict_(dict), kernel_(kernel) {}
  const char* kernel() const { return kernel_; }  // the kernel's name, for errors

  template <typename T = void>
  T* ptr(const char* name) {
    return reinterpret_cast<T*>(get(name).cast<uintptr_t>());
  }
  int64_t i64(const char* name) { return get(name).cast<int64_t>(); }
  double f64(const char* name) { return get(name).cast<double>(); }
  bool flag(const char* name) { return get(name).cast<bool>(); }
  DType dtype() { return DType(get("dtype").cast<int>()); }
  // A nested dict: a [tokens, heads, head_dim] view, the sequences of a batch, a decoding step's layer.
  Fields nested(const py::handle& dict) { return Fields(dict.cast<py::dict>(), kernel_); }
  Fields nested(const char* name) { return nested(get(name)); }
  py::list list(const char* name) { return get(name).cast<py::list>(); }
  StridedTensor strided(const char* name) {
    Fields view = nested(name);
    StridedTensor t{view.ptr("data"), view.i64("token_stride"), view.i64("head_stride")};
    view.done();
    return t;
  }

  // Call after reading every field.
  void done() const {
    for (const auto& item : dict_) {
      const auto key = item.first.cast<std::string>();
      if (!read_.count(key)) throw py::key_error(std::string(kernel_) + ": unknown argument '" + key + "'");
    }
  }

 private:
  py::object get(const char* name) {
    if (!dict_.contains(name)) throw py::key_error(std::string(kernel_) + ": missing argument '" + name + "'");
    read_.insert(name);
    return dict_[name];
  }

  py::dict dict_;
  const char* kernel_;
  std::set<std::string> read_;
};

// One reader per struct of kernels.h, its fields in the struct's order.

inline GluActivation glu_activation(int64_t code) {
  if (code < 0 || code > static_cast<int64_t>(GluActivation::gelu_tanh))
    throw std::invalid_argument("aquila: unknown GLU activation code " + std::to_string(code));
  return static_cast<GluActivation>(code);
}

inline RmsNormForward read(Fields& f, RmsNormForward*) {
  return {f.ptr("x"), f.i64("x_row_stride"), f.ptr("residual"), f.i64("residual_row_stride"), f.ptr<float>("weight"),
          f.ptr("out"), f.ptr("residual_out"), f.ptr<float>("rstd"), f.i64("rows"), f.i64("hidden"), f.f64("eps"),
          f.flag("round_normalized"), f.dtype()};
}

inline RmsNormBackward read(Fields& f, RmsNormBackward*) {
  return {f.ptr("grad_out"), f.i64("grad_out_row_stride"), f.ptr("input"), f.i64("input_row_stride"),
          f.ptr<float>("weight"), f.ptr<float>("rstd"), f.ptr("grad_residual"), f.i64("grad_residual_row_stride"),
          f.ptr("grad_input"), f.ptr<float>("grad_weight_partials"), f.i64("partial_rows"), f.i64("rows"),
          f.i64("hidden"), f.dtype()};
}

inline Rotary read(Fields& f, Rotary*) {
  return {f.ptr("x"), f.i64("x_stride_batch"), f.i64("x_stride_seq"), f.i64("x_stride_head"), f.ptr("out"),
          f.i64("out_stride_batch"), f.i64("out_stride_seq"), f.i64("out_stride_head"), f.ptr<int64_t>("positions"),
          f.i64("positions_stride_batch"), f.i64("positions_stride_seq"), f.i64("offset"), f.i64("batch"),
          f.i64("seq"), f.i64("heads"), f.i64("head_dim"), f.f64("theta"), f.flag("interleaved"), f.flag("inverse"),
          f.ptr<float>("cos"), f.ptr<float>("sin"), f.i64("table_stride_batch"), f.i64("table_stride_seq"),
          f.dtype()};
}

inline GluForward read(Fields& f, GluForward*) {
  return {f.ptr("gate"), f.i64("gate_row_stride"), f.ptr("up"), f.i64("up_row_stride"), f.ptr("out"), f.i64("rows"),
          f.i64("cols"), glu_activation(f.i64("activation")), f.dtype()};
}

inline GluBackward read(Fields& f, GluBackward*) {
  return {f.ptr("grad_out"), f.i64("grad_out_row_stride"), f.ptr("gate"), f.i64("gate_row_stride"), f.ptr("up"),
          f.i64("up_row_stride"), f.ptr("grad_gate"), f.ptr("grad_up"), f.i64("rows"), f.i64("cols"),
          glu_activation(f.i64("activation")), f.dtype()};
}

inline CrossEntropy read(Fields& f, CrossEntropy*) {
  return {f.ptr("logits"), f.i64("logits_row_stride"), f.ptr<int64_t>("targets"), f.ptr<float>("class_weights"),
          f.ptr<float>("loss"), f.ptr<float>("lse"), f.ptr<int64_t>("argmax"), f.ptr("grad"),
          f.i64("grad_row_stride"), f.ptr<float>("grad_scale"), f.i64("rows"), f.i64("vocab"),
          f.i64("ignore_index"), f.f64("label_smoothing"), f.f64("z_loss"), f.f64("softcap"), f.dtype()};
}

inline AttentionSequences read_sequences(Fields f) {
  AttentionSequences seq{f.ptr<const int32_t>("q_start"), f.ptr<const int32_t>("q_len"),
                         f.ptr<const int32_t>("k_start"), f.ptr<const int32_t>("k_len"), f.i64("batch"),
                         f.i64("max_q_len"), f.i64("max_k_len")};
  f.done();
  return seq;
}

inline AttentionForward read(Fields& f, AttentionForward*) {
  return {f.strided("q"), f.strided("k"), f.strided("v"), f.strided("out"), f.ptr<float>("lse"),
          read_sequences(f.nested("seq")), f.i64("heads_q"), f.i64("heads_k"), f.i64("head_dim"), f.f64("scale"),
          f.flag("causal"), f.i64("window_left"), f.i64("window_right"), static_cast<float>(f.f64("softcap")),
          f.dtype(), f.ptr<float>("partial_out"), f.ptr<float>("partial_lse"), f.i64("splits")};
}

inline AttentionBackward read(Fields& f, AttentionBackward*) {
  return {f.strided("q"), f.strided("k"), f.strided("v"), f.strided("out"), f.strided("grad_out"),
          f.ptr<const float>("lse"), f.strided("grad_q"), f.strided("grad_k"), f.strided("grad_v"),
          f.ptr<float>("delta"), read_sequences(f.nested("seq")), f.i64("heads_q"), f.i64("heads_k"),
          f.i64("head_dim"), f.f64("scale"), f.flag("causal"), f.i64("window_left"), f.i64("window_right"),
          static_cast<float>(f.f64("softcap")), f.dtype()};
}

// Binds `kernel` as `name(args: dict, launch)`: the dict is read while holding the GIL, the kernel runs without it.
template <typename Args, typename Launch>
void bind_kernel(py::module_& m, const char* name, const char* launch_name, void (*kernel)(const Args&, Launch)) {
  m.def(
      name,
      [=](const py::dict& dict, Launch launch) {
        Fields fields(dict, name);
        const Args args = read(fields, static_cast<Args*>(nullptr));
        fields.done();
        py::gil_scoped_release no_gil;
        kernel(args, launch);
      },
      py::arg("args"), py::arg(launch_name));
}

}  // namespace aquila
