// olmo2_kernels._C: the thin layer between Python and the framework-free kernels.
//
// Tensors cross this boundary as raw device pointers (Python ints), sizes and
// strides; the Python side (olmo2_kernels/_compiled.py) validates inputs,
// allocates outputs and picks the CUDA stream. Nothing here includes torch, so
// the module builds with a CPU-only torch installed (or none) and survives torch
// upgrades.
//
// Submodules `cpu` and (when built with CUDA) `cuda` hold the same functions,
// one per entry point of the op table (common/op_table.h, bound by
// bindings/ops.h); `capabilities()["ops"]` lists the ops per device and
// `param_layouts()` the parameter structs' layout.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/ops.h"
#include "common/param_layout.h"
#include "cpu/info.h"
#include "cpu/kernels.h"
#ifdef OLMO2_HAVE_CUDA
#include "cuda/launchers.h"
#endif

namespace py = pybind11;

#ifndef OLMO2_KERNELS_VERSION
#define OLMO2_KERNELS_VERSION "0.0.0"
#endif

namespace {

// Public op names (olmo2_kernels op modules) that the kernels of this module back.
const std::vector<std::string> kOps = {
#define OLMO2_PUBLIC_OP_NAME(name) #name,
    OLMO2_PUBLIC_OPS(OLMO2_PUBLIC_OP_NAME)
#undef OLMO2_PUBLIC_OP_NAME
};

// The forwarders register_ops() binds: one per entry point of the op table.
struct CpuBackend {
#define OLMO2_CPU_FORWARDER(kernel, Params, ...) \
  static void kernel(const olmo2::Params& p, void*) { olmo2::cpu::kernel(p); }
  OLMO2_OPS(OLMO2_CPU_FORWARDER)
#undef OLMO2_CPU_FORWARDER
};

#ifdef OLMO2_HAVE_CUDA
struct CudaBackend {
#define OLMO2_CUDA_FORWARDER(kernel, Params, ...) \
  static void kernel(const olmo2::Params& p, void* stream) { olmo2::cuda::kernel(p, stream); }
  OLMO2_OPS(OLMO2_CUDA_FORWARDER)
#undef OLMO2_CUDA_FORWARDER
};
#endif

// {kernel: {"params": struct name, "size": bytes, "fields": [(name, type, offset), ...]}}
py::dict param_layouts() {
  py::dict out;
  for (const olmo2::ParamsLayout& layout : olmo2::param_layouts()) {
    py::list fields;
    for (const olmo2::FieldLayout& f : layout.fields) fields.append(py::make_tuple(f.name, f.type, f.offset));
    py::dict entry;
    entry["params"] = layout.params;
    entry["size"] = layout.size;
    entry["fields"] = fields;
    out[layout.kernel] = entry;
  }
  return out;
}

py::dict capabilities() {
  py::dict caps;
  caps["version"] = OLMO2_KERNELS_VERSION;
  caps["cpu"] = true;
  caps["openmp"] = olmo2::cpu::has_openmp();
  caps["cpu_threads"] = olmo2::cpu::num_threads();
  caps["cpu_isa"] = olmo2::cpu::cpu_isa();
  caps["cpu_isas"] = olmo2::cpu::cpu_isas();
  caps["cpu_isas_built"] = olmo2::cpu::cpu_isas_built();
  py::dict ops;
  ops["cpu"] = kOps;
#ifdef OLMO2_HAVE_CUDA
  caps["cuda"] = true;
  caps["cuda_archs"] = std::string(OLMO2_CUDA_ARCHS);
  ops["cuda"] = kOps;
#else
  caps["cuda"] = false;
  caps["cuda_archs"] = std::string();
  ops["cuda"] = std::vector<std::string>();
#endif
  caps["ops"] = ops;
  return caps;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "olmo2_kernels compiled kernels (CPU, and CUDA when built with it)";
  m.def("version", []() { return std::string(OLMO2_KERNELS_VERSION); });
  m.def("capabilities", &capabilities, "What this build of the extension contains");
  m.def("param_layouts", &param_layouts,
        "Layout of each kernel's parameter struct (common/op_table.h): name, type and byte offset per field");

  py::module_ cpu = m.def_submodule("cpu", "C++ kernels for CPU tensors (OpenMP over rows)");
  olmo2::bindings::register_ops<CpuBackend>(cpu);
  cpu.def(
      "set_num_threads", [](int n) { olmo2::cpu::set_num_threads(n); }, py::arg("n"),
      "Threads the CPU kernels use (n <= 0: OpenMP's default)");
  cpu.def("num_threads", &olmo2::cpu::num_threads, "Threads the CPU kernels use");
  cpu.def(
      "set_isa", [](const std::string& name) { olmo2::cpu::set_cpu_isa(name); }, py::arg("name"),
      "Run the kernels built for this instruction set: 'auto' (the best this processor supports), "
      "'baseline' or 'avx2'; ValueError when unknown or unsupported here");
  cpu.def("isa", &olmo2::cpu::cpu_isa, "The instruction set the CPU kernels run");
  cpu.def("isas", &olmo2::cpu::cpu_isas, "Instruction sets built into this module and supported here, best last");
  cpu.def(
      "cast",
      [](std::uintptr_t src, int src_dtype, std::uintptr_t dst, int dst_dtype, std::int64_t n) {
        olmo2::bindings::check_dtype("cast", "src dtype", src_dtype);
        olmo2::bindings::check_dtype("cast", "dst dtype", dst_dtype);
        olmo2::bindings::check_size("cast", "n", n);
        olmo2::bindings::check_ptr("cast", "src", reinterpret_cast<const void*>(src), n > 0);
        olmo2::bindings::check_ptr("cast", "dst", reinterpret_cast<void*>(dst), n > 0);
        py::gil_scoped_release no_gil;
        olmo2::cpu::cast(reinterpret_cast<const void*>(src), src_dtype, reinterpret_cast<void*>(dst), dst_dtype, n);
      },
      py::arg("src"), py::arg("src_dtype"), py::arg("dst"), py::arg("dst_dtype"), py::arg("n"),
      "Convert n contiguous elements between dtypes with the kernels' rounding");

#ifdef OLMO2_HAVE_CUDA
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels for CUDA tensors (launched on the given stream)");
  olmo2::bindings::register_ops<CudaBackend>(cuda);
#endif
}
