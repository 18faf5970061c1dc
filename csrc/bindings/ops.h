// Python signatures of the kernels, shared by the `cpu` and `cuda` submodules.
//
// Every function takes tensors as integer addresses (tensor.data_ptr()), sizes
// and row strides in elements, dtype codes (common/dtype.h) and, last, a CUDA
// stream handle (ignored by the CPU kernels). The arguments are checked
// (checks.h) and packed into the op's parameter struct; then the GIL is
// released and Backend runs the kernel.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings/checks.h"
#include "common/params.h"

namespace olmo2::bindings {

namespace py = pybind11;

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename P, typename Launch>
inline void run(const P& params, std::uintptr_t stream, Launch&& launch) {
  check(params);
  py::gil_scoped_release no_gil;
  launch(params, reinterpret_cast<void*>(stream));
}

template <typename Backend>
void register_ops(py::module_& m) {
  using u = std::uintptr_t;
  using i64 = std::int64_t;

  m.def(
      "rms_norm_fwd",
      [](u x, i64 x_stride, u w, u y, i64 y_stride, u rstd, i64 rows, i64 cols, double eps, int x_dtype,
         int w_dtype, u stream) {
        RmsNormFwdParams p{ptr<const void>(x), x_stride, ptr<const void>(w), ptr<void>(y), y_stride,
                           ptr<float>(rstd), rows, cols, static_cast<float>(eps), x_dtype, w_dtype};
        run(p, stream, Backend::rms_norm_fwd);
      },
      py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("y"), py::arg("y_stride"), py::arg("rstd"),
      py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("x_dtype"), py::arg("w_dtype"),
      py::arg("stream") = 0, "RMSNorm forward: y and the per-row fp32 rstd");

  m.def(
      "rms_norm_bwd",
      [](u dy, i64 dy_stride, u x, i64 x_stride, u w, u rstd, u dx, i64 dx_stride, u dw, u partial,
         i64 n_partials, i64 rows, i64 cols, int x_dtype, int w_dtype, u stream) {
        RmsNormBwdParams p{ptr<const void>(dy), dy_stride, ptr<const void>(x), x_stride, ptr<const void>(w),
                           ptr<const float>(rstd), ptr<void>(dx), dx_stride, ptr<void>(dw), ptr<float>(partial),
                           n_partials, rows, cols, x_dtype, w_dtype};
        run(p, stream, Backend::rms_norm_bwd);
      },
      py::arg("dy"), py::arg("dy_stride"), py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("rstd"),
      py::arg("dx"), py::arg("dx_stride"), py::arg("dw"), py::arg("partial"), py::arg("n_partials"),
      py::arg("rows"), py::arg("cols"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream") = 0,
      "RMSNorm backward: dx and dweight (partial: fp32 n_partials x cols workspace, CUDA only)");

  m.def(
      "norm_rope_fwd",
      [](u x, i64 x_stride, u w, u cos, u sin, u y, i64 y_stride, u rstd, i64 rows, i64 cols, i64 seq_len,
         i64 head_dim, double eps, int x_dtype, int w_dtype, u stream) {
        NormRopeFwdParams p{ptr<const void>(x), x_stride, ptr<const void>(w), ptr<const float>(cos),
                            ptr<const float>(sin), ptr<void>(y), y_stride, ptr<float>(rstd), rows, cols,
                            seq_len, head_dim, static_cast<float>(eps), x_dtype, w_dtype};
        run(p, stream, Backend::norm_rope_fwd);
      },
      py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("cos"), py::arg("sin"), py::arg("y"),
      py::arg("y_stride"), py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("seq_len"),
      py::arg("head_dim"), py::arg("eps"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream") = 0,
      "RMSNorm over each row, then rotate_half RoPE per head (cos/sin fp32 (seq_len, head_dim))");

  m.def(
      "norm_rope_bwd",
      [](u dy, i64 dy_stride, u x, i64 x_stride, u w, u rstd, u cos, u sin, u dx, i64 dx_stride, u dw,
         u partial, i64 n_partials, i64 rows, i64 cols, i64 seq_len, i64 head_dim, int x_dtype, int w_dtype,
         u stream) {
        NormRopeBwdParams p{ptr<const void>(dy), dy_stride, ptr<const void>(x), x_stride, ptr<const void>(w),
                            ptr<const float>(rstd), ptr<const float>(cos), ptr<const float>(sin), ptr<void>(dx),
                            dx_stride, ptr<void>(dw), ptr<float>(partial), n_partials, rows, cols, seq_len,
                            head_dim, x_dtype, w_dtype};
        run(p, stream, Backend::norm_rope_bwd);
      },
      py::arg("dy"), py::arg("dy_stride"), py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("rstd"),
      py::arg("cos"), py::arg("sin"), py::arg("dx"), py::arg("dx_stride"), py::arg("dw"), py::arg("partial"),
      py::arg("n_partials"), py::arg("rows"), py::arg("cols"), py::arg("seq_len"), py::arg("head_dim"),
      py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream") = 0, "Backward of norm_rope_fwd: dx and dweight");

  m.def(
      "cross_entropy_fwd",
      [](u logits, i64 logits_stride, u labels, u ce, u z, u lse, i64 rows, i64 vocab, i64 ignore_index,
         double z_coef, int dtype, u stream) {
        CrossEntropyFwdParams p{ptr<const void>(logits), logits_stride, ptr<const int64_t>(labels), ptr<float>(ce),
                                ptr<float>(z), ptr<float>(lse), rows, vocab, ignore_index,
                                static_cast<float>(z_coef), dtype};
        run(p, stream, Backend::cross_entropy_fwd);
      },
      py::arg("logits"), py::arg("logits_stride"), py::arg("labels"), py::arg("ce"), py::arg("z"), py::arg("lse"),
      py::arg("rows"), py::arg("vocab"), py::arg("ignore_index"), py::arg("z_coef"), py::arg("dtype"),
      py::arg("stream") = 0, "Per-row cross-entropy, z-loss and log-sum-exp (fp32); labels int64");

  m.def(
      "cross_entropy_bwd",
      [](u logits, i64 logits_stride, u labels, u lse, u grad_ce, i64 grad_ce_stride, u grad_z,
         i64 grad_z_stride, u out, i64 out_stride, i64 rows, i64 vocab, i64 ignore_index, double z_coef,
         int dtype, int out_dtype, u stream) {
        CrossEntropyBwdParams p{ptr<const void>(logits), logits_stride, ptr<const int64_t>(labels),
                                ptr<const float>(lse), ptr<const float>(grad_ce), grad_ce_stride,
                                ptr<const float>(grad_z), grad_z_stride, ptr<void>(out), out_stride, rows, vocab,
                                ignore_index, static_cast<float>(z_coef), dtype, out_dtype};
        run(p, stream, Backend::cross_entropy_bwd);
      },
      py::arg("logits"), py::arg("logits_stride"), py::arg("labels"), py::arg("lse"), py::arg("grad_ce"),
      py::arg("grad_ce_stride"), py::arg("grad_z"), py::arg("grad_z_stride"), py::arg("out"),
      py::arg("out_stride"), py::arg("rows"), py::arg("vocab"), py::arg("ignore_index"), py::arg("z_coef"),
      py::arg("dtype"), py::arg("out_dtype"), py::arg("stream") = 0,
      "Gradient of the logits into out of any float dtype (out may be the logits buffer when dtype and "
      "stride match)");

  m.def(
      "swiglu_fwd",
      [](u gate, i64 gate_stride, u up, i64 up_stride, u y, i64 y_stride, i64 rows, i64 cols, int dtype,
         u stream) {
        SwigluFwdParams p{ptr<const void>(gate), gate_stride, ptr<const void>(up), up_stride, ptr<void>(y),
                          y_stride, rows, cols, dtype};
        run(p, stream, Backend::swiglu_fwd);
      },
      py::arg("gate"), py::arg("gate_stride"), py::arg("up"), py::arg("up_stride"), py::arg("y"),
      py::arg("y_stride"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("stream") = 0,
      "y = silu(gate) * up");

  m.def(
      "swiglu_bwd",
      [](u dy, i64 dy_stride, u gate, i64 gate_stride, u up, i64 up_stride, u dgate, i64 dgate_stride, u dup,
         i64 dup_stride, i64 rows, i64 cols, int dtype, u stream) {
        SwigluBwdParams p{ptr<const void>(dy), dy_stride, ptr<const void>(gate), gate_stride, ptr<const void>(up),
                          up_stride, ptr<void>(dgate), dgate_stride, ptr<void>(dup), dup_stride, rows, cols, dtype};
        run(p, stream, Backend::swiglu_bwd);
      },
      py::arg("dy"), py::arg("dy_stride"), py::arg("gate"), py::arg("gate_stride"), py::arg("up"),
      py::arg("up_stride"), py::arg("dgate"), py::arg("dgate_stride"), py::arg("dup"), py::arg("dup_stride"),
      py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("stream") = 0, "dgate and dup of swiglu_fwd");
}

}  // namespace olmo2::bindings
