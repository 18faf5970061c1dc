"""The compiled extension ``olmo2_kernels._C``: it loads, says what it holds, takes
keyword arguments named after the op table's fields (csrc/common/op_table.h)
and rejects impossible ones with Python exceptions, and its launchers
(``olmo2_kernels._compiled``) hold to their input contract and match the
float64 spec on every op, forward and backward, for fp32, bf16 and fp16, odd
shapes and strided rows.

The op test files also run the ``cpu``/``cuda`` backends through their public
ops; these tests call the launchers directly, so the kernels are covered even
where an op module does not dispatch to them. Every launcher test runs on
``cpu``, on ``cuda-emulated`` (the CUDA kernels compiled for the host, see
below) and, on a GPU machine, on ``cuda``.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulation
import olmo2_kernels
from olmo2_kernels import _compiled, _extension, reference
from tolerances import assert_close, f64_leaf

C = _extension.module()
pytestmark = pytest.mark.skipif(C is None, reason=f"extension not loaded: {_extension.load_error()}")

OPS = ("rms_norm", "qk_norm_rope", "cross_entropy", "linear_cross_entropy", "swiglu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HAS_CUDA_KERNELS = torch.cuda.is_available() and _extension.has_cuda_kernels()
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- CUDA kernels on CPU
# Without a GPU, the CUDA kernels still run here (tests/cuda_emulation.py): the
# launcher tests below call them through the same _compiled plumbing (pointers,
# strides, alignment choices) as on a GPU.
@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    reason = cuda_emulation.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cuda_emulation.kernels(tmp_path_factory.mktemp("cuda_emulation"))


# The CPU kernels run the best instruction set the processor has (cpu/isa.h);
# "cpu-<isa>" runs the launcher tests again on each other ISA built and supported.
CPU_ISAS = list(C.cpu.isas()) if C is not None else []
OTHER_CPU_ISAS = [isa for isa in CPU_ISAS if C is not None and isa != C.cpu.isa()]
DEVICES = ["cpu"] + [f"cpu-{isa}" for isa in OTHER_CPU_ISAS] + ["cuda-emulated"] + (["cuda"] if HAS_CUDA_KERNELS else [])


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device the launchers run on; ``cuda-emulated``: CPU tensors, CUDA kernels;
    ``cpu-<isa>``: CPU tensors, the CPU kernels built for that instruction set."""
    if request.param.startswith("cpu-"):
        previous = C.cpu.isa()
        C.cpu.set_isa(request.param[len("cpu-"):])
        request.addfinalizer(lambda: C.cpu.set_isa(previous))
        return torch.device("cpu")
    if request.param != "cuda-emulated":
        return torch.device(request.param)
    kernels = request.getfixturevalue("emulated_cuda")
    monkeypatch.setattr(_compiled, "_kernels", lambda op, device: (kernels, 0))
    # A few blocks share each weight-gradient reduction, as on a GPU.
    monkeypatch.setattr(_compiled, "_n_partials", lambda rows, device: max(1, min(rows, 5)))
    return torch.device("cpu")


# --------------------------------------------------------------------------- loading
def test_loads_and_lists_ops():
    assert _extension.load_error() is None
    caps = _extension.capabilities()
    assert caps["cpu"] is True
    assert set(caps["ops"]["cpu"]) == set(OPS)
    if caps["cuda"]:
        assert set(caps["ops"]["cuda"]) == set(OPS)
    else:
        assert caps["ops"]["cuda"] == []
    assert C.version() == caps["version"]


def test_backend_info_shows_cpu():
    info = olmo2_kernels.backend_info()
    assert info["extension"]["loaded"]
    assert "cpu" in info["backends"]["cpu"]["available"]
    for op in OPS:
        assert _extension.has_op("cpu", op)


def test_cpu_isa_choice():
    caps = _extension.capabilities()
    assert caps["cpu_isas_built"][0] == "baseline"
    assert caps["cpu_isas"][0] == "baseline"
    assert set(caps["cpu_isas"]) <= set(caps["cpu_isas_built"])
    # The best supported one runs unless OLMO2_KERNELS_CPU_ISA chose another.
    chosen = os.environ.get("OLMO2_KERNELS_CPU_ISA", "auto")
    assert caps["cpu_isa"] == (caps["cpu_isas"][-1] if chosen == "auto" else chosen)
    previous = C.cpu.isa()
    try:
        for isa in caps["cpu_isas"]:
            C.cpu.set_isa(isa)
            assert C.cpu.isa() == isa == _extension.capabilities()["cpu_isa"]
        with pytest.raises(ValueError, match="expected one of 'auto', 'baseline', 'avx2'"):
            C.cpu.set_isa("avx512")
        if "avx2" not in caps["cpu_isas"]:
            with pytest.raises(ValueError, match="cpu ISA 'avx2'"):
                C.cpu.set_isa("avx2")
        assert C.cpu.isa() == caps["cpu_isas"][-1]  # a refused choice changes nothing
        C.cpu.set_isa("auto")
        assert C.cpu.isa() == caps["cpu_isas"][-1]
    finally:
        C.cpu.set_isa(previous)


def test_bad_cpu_isa_env_makes_the_extension_unavailable_with_the_reason():
    code = (
        "import olmo2_kernels, sys; info = olmo2_kernels.backend_info(); "
        "print(info['extension']['error']); print(info['backends']['cpu']['unavailable_reason'].get('cpu'))"
    )
    env = dict(os.environ, OLMO2_KERNELS_CPU_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OLMO2_KERNELS_CPU_ISA='sse9' cannot be used" in out.stdout
    assert "expected one of 'auto', 'baseline', 'avx2'" in out.stdout


def _objects(kind: str) -> list[Path]:
    return sorted(ROOT.glob(f"build/*/CMakeFiles/{kind}.dir/csrc/**/*.o"))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_only_the_avx2_build_holds_avx_instructions():
    """Loading the module and running the baseline kernels must never execute an
    AVX instruction: only the objects of the AVX2 build may contain one."""
    baseline = _objects("olmo2_cpu_baseline") + _objects("olmo2_cpu_kernels") + _objects("_C")
    if not _objects("olmo2_cpu_baseline"):
        pytest.skip("no build folder with object files (installed from a wheel)")
    for obj in baseline:
        asm = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, check=True).stdout
        assert "%ymm" not in asm and "vfmadd" not in asm, f"{obj.name} ({obj.parent.parent.name}) uses AVX"
    avx2 = _objects("olmo2_cpu_avx2")
    if "avx2" in _extension.capabilities()["cpu_isas_built"]:
        assert avx2, "the extension reports an AVX2 build but its objects are missing"
        asm = subprocess.run(["objdump", "-d", str(avx2[0])], capture_output=True, text=True, check=True).stdout
        assert "%ymm" in asm  # the check above can see AVX code


def test_cpu_threads_follow_torch():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _compiled.swiglu_fwd(torch.randn(4, 8), torch.randn(4, 8))
        assert C.cpu.num_threads() == 1
    finally:
        torch.set_num_threads(old)
        _compiled.swiglu_fwd(torch.randn(4, 8), torch.randn(4, 8))
    assert C.cpu.num_threads() == old


# --------------------------------------------------------------------------- bad arguments
class TestBindingsRejectBadArguments:
    """Impossible arguments raise before any kernel runs (never a crash)."""

    def setup_method(self):
        self.x = torch.randn(4, 8)
        self.w = torch.ones(8)
        self.y = torch.empty(4, 8)
        self.rstd = torch.empty(4)

    def rms(self, **overrides):
        args = dict(
            x=self.x.data_ptr(), x_stride=8, w=self.w.data_ptr(), y=self.y.data_ptr(), y_stride=8,
            rstd=self.rstd.data_ptr(), rows=4, cols=8, eps=1e-6, x_dtype=0, w_dtype=0,
        )
        args.update(overrides)
        C.cpu.rms_norm_fwd(**args)

    def test_valid_call_runs(self):
        self.rms()
        assert_close(self.y, reference.rms_norm(self.x.double(), self.w.double()), torch.float32)

    @pytest.mark.parametrize("field", ["x_dtype", "w_dtype"])
    @pytest.mark.parametrize("code", [-1, 3, 99])
    def test_unknown_dtype_code(self, field, code):
        with pytest.raises(ValueError, match=rf"rms_norm_fwd: .*dtype code .*got {code}"):
            self.rms(**{field: code})

    @pytest.mark.parametrize("field", ["rows", "cols"])
    def test_negative_size(self, field):
        with pytest.raises(ValueError, match=f"rms_norm_fwd: {field} must be >= 0, got -3"):
            self.rms(**{field: -3})

    def test_null_pointer(self):
        with pytest.raises(ValueError, match="rms_norm_fwd: x is a null pointer"):
            self.rms(x=0)

    def test_short_row_stride(self):
        with pytest.raises(ValueError, match="rms_norm_fwd: y: row stride 7 is shorter than a row"):
            self.rms(y_stride=7)

    def test_negative_stride(self):
        with pytest.raises(ValueError, match="row stride must be >= 0"):
            self.rms(x_stride=-8)

    def test_stride_overflow(self):
        with pytest.raises(ValueError, match="overflows int64"):
            self.rms(x_stride=2**62)

    def test_negative_pointer_is_a_type_error(self):
        with pytest.raises(TypeError):
            self.rms(x=-16)

    def test_empty_is_fine_with_null_pointers(self):
        C.cpu.rms_norm_fwd(x=0, x_stride=0, w=0, y=0, y_stride=0, rstd=0, rows=0, cols=8, eps=1e-6, x_dtype=0,
                           w_dtype=0)

    def test_keywords_only(self):
        """16 positional integers are easy to misorder: every argument is named."""
        with pytest.raises(TypeError):
            C.cpu.rms_norm_fwd(0, 0, 0, 0, 0, 0, 0, 8, 1e-6, 0, 0)
        with pytest.raises(TypeError):
            self.rms(rstd_pointer=self.rstd.data_ptr())  # an unknown keyword

    def norm_rope(self, cos, **overrides):
        args = dict(
            x=self.x.data_ptr(), x_stride=8, w=self.w.data_ptr(), cos=cos.data_ptr(), sin=cos.data_ptr(),
            y=self.y.data_ptr(), y_stride=8, rstd=self.rstd.data_ptr(), rows=4, cols=8, seq_len=4, head_dim=8,
            eps=1e-6, x_dtype=0, w_dtype=0,
        )
        args.update(overrides)
        C.cpu.norm_rope_fwd(**args)

    @pytest.mark.parametrize("head_dim, msg", [(3, "head_dim must be a positive even"), (0, "head_dim must be"),
                                               (6, r"cols \(8\) must be a multiple of head_dim \(6\)")])
    def test_norm_rope_head_dim(self, head_dim, msg):
        cos = torch.ones(4, max(head_dim, 1))
        with pytest.raises(ValueError, match=f"norm_rope_fwd: {msg}"):
            self.norm_rope(cos, head_dim=head_dim)

    def test_norm_rope_zero_seq_len(self):
        with pytest.raises(ValueError, match="norm_rope_fwd: seq_len must be > 0"):
            self.norm_rope(torch.ones(4, 8), seq_len=0)

    def cross_entropy_fwd(self, **overrides):
        labels = torch.zeros(4, dtype=torch.int64)
        out = [torch.empty(4) for _ in range(3)]
        args = dict(
            logits=self.x.data_ptr(), logits_stride=8, labels=labels.data_ptr(), ce=out[0].data_ptr(),
            z=out[1].data_ptr(), lse=out[2].data_ptr(), rows=4, vocab=8, ignore_index=-100, z_coef=0.0, dtype=0,
        )
        args.update(overrides)
        C.cpu.cross_entropy_fwd(**args)

    def test_cross_entropy_bad_vocab_and_dtype(self):
        with pytest.raises(ValueError, match="cross_entropy_fwd: vocab must be >= 0"):
            self.cross_entropy_fwd(vocab=-8)
        with pytest.raises(ValueError, match="cross_entropy_fwd: dtype must be a dtype code"):
            self.cross_entropy_fwd(dtype=7)

    def cross_entropy_bwd(self, **overrides):
        t = torch.zeros(4)
        labels = torch.zeros(4, dtype=torch.int64)
        args = dict(
            logits=self.x.data_ptr(), logits_stride=8, labels=labels.data_ptr(), lse=t.data_ptr(),
            grad_ce=t.data_ptr(), grad_ce_stride=1, grad_z=t.data_ptr(), grad_z_stride=1, out=self.y.data_ptr(),
            out_stride=8, rows=4, vocab=8, ignore_index=-100, z_coef=0.0, dtype=0, out_dtype=0,
        )
        args.update(overrides)
        C.cpu.cross_entropy_bwd(**args)

    def test_cross_entropy_bwd_alias_with_other_stride(self):
        with pytest.raises(ValueError, match="out aliases logits with a different row stride"):
            self.cross_entropy_bwd(out=self.x.data_ptr(), out_stride=16)

    def test_cross_entropy_bwd_alias_with_other_dtype(self):
        with pytest.raises(ValueError, match=r"out aliases logits with a different dtype \(code 1 vs 0\)"):
            self.cross_entropy_bwd(out=self.x.data_ptr(), out_dtype=1)

    def test_cross_entropy_bwd_bad_out_dtype(self):
        with pytest.raises(ValueError, match="cross_entropy_bwd: out_dtype must be a dtype code"):
            self.cross_entropy_bwd(out_dtype=3)

    def test_cross_entropy_bwd_negative_grad_stride(self):
        with pytest.raises(ValueError, match="cross_entropy_bwd: grad_z_stride must be >= 0, got -1"):
            self.cross_entropy_bwd(grad_z_stride=-1)

    def test_swiglu_bad_dtype(self):
        with pytest.raises(ValueError, match="swiglu_fwd: dtype must be a dtype code"):
            C.cpu.swiglu_fwd(gate=self.x.data_ptr(), gate_stride=8, up=self.x.data_ptr(), up_stride=8,
                             y=self.y.data_ptr(), y_stride=8, rows=4, cols=8, dtype=5)

    def test_cast_bad_arguments(self):
        with pytest.raises(ValueError, match="cast: n must be >= 0"):
            C.cpu.cast(self.x.data_ptr(), 0, self.y.data_ptr(), 1, -1)
        with pytest.raises(ValueError, match="cast: dst dtype must be a dtype code"):
            C.cpu.cast(self.x.data_ptr(), 0, self.y.data_ptr(), 4, 1)

    def test_launcher_rejects_float64(self):
        with pytest.raises(TypeError, match="rms_norm: x must be float32, bfloat16 or float16"):
            _compiled.rms_norm_fwd(torch.randn(2, 4, dtype=torch.float64), torch.ones(4), 1e-6)


def test_param_layouts_describe_the_structs(emulated_cuda):
    """The extension and the CUDA emulation (another compiler, C++20) describe each
    parameter struct of the op table alike, and ctypes lays the emulation's
    mirror out at the described offsets (cuda_emulation.params_struct checks it)."""
    layouts = {
        kernel: {**layout, "fields": [list(field) for field in layout["fields"]]}
        for kernel, layout in C.param_layouts().items()
    }
    assert layouts == emulated_cuda.layouts
    for kernel, layout in layouts.items():
        assert hasattr(C.cpu, kernel) and hasattr(emulated_cuda, kernel)
        names = [name for name, _, _ in layout["fields"]]
        assert len(set(names)) == len(names) and "stream" not in names
        offsets = [offset for _, _, offset in layout["fields"]]
        assert offsets == sorted(offsets) and offsets[-1] < layout["size"]
    assert layouts["rms_norm_fwd"]["fields"][:2] == [["x", "pointer", 0], ["x_stride", "int64", 8]]


# --------------------------------------------------------------------------- the launchers' input contract
class TestLaunchersTrustTheOpModules:
    """The op modules normalize inputs (rows, contiguity, label and table dtypes) once
    for every backend; the compiled launchers take them as they come and refuse,
    with one error naming the argument, anything else rather than copying again."""

    def test_rows_must_be_2d(self):
        with pytest.raises(ValueError, match=r"swiglu_fwd: gate must be 2-D .* got shape \(2, 3, 50\)"):
            _compiled.swiglu_fwd(torch.randn(2, 3, 50), torch.randn(2, 3, 50))

    def test_rows_need_unit_column_stride(self):
        x = torch.randn(8, 4).t()
        with pytest.raises(ValueError, match=r"rms_norm_fwd: x must be 2-D with unit stride .* strides \(1, 4\)"):
            _compiled.rms_norm_fwd(x, torch.ones(8), 1e-6)

    def test_upstream_gradient_in_the_inputs_dtype(self):
        x = torch.randn(3, 8, dtype=torch.bfloat16)
        _, rstd = _compiled.rms_norm_fwd(x, torch.ones(8), 1e-6)
        with pytest.raises(TypeError, match="rms_norm_bwd: dy must be bfloat16 .* got float32"):
            _compiled.rms_norm_bwd(torch.randn(3, 8), x, torch.ones(8), rstd)

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"rms_norm_fwd: weight must be 1-D contiguous of shape \(8,\)"):
            _compiled.rms_norm_fwd(torch.randn(3, 8), torch.ones(7), 1e-6)

    def test_labels_int64(self):
        with pytest.raises(TypeError, match="cross_entropy_fwd: labels must be int64 .* got int32"):
            _compiled.cross_entropy_fwd(torch.randn(3, 8), torch.zeros(3, dtype=torch.int32), -100, 0.0)

    def test_tables_fp32(self):
        cos = torch.ones(2, 4, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match="norm_rope_fwd: cos must be float32 .* got bfloat16"):
            _compiled.norm_rope_fwd(torch.randn(2, 8), torch.ones(8), cos, cos, 4, 1e-6)

    def test_tables_width_is_head_dim(self):
        cos = torch.ones(2, 8)
        with pytest.raises(ValueError, match=r"norm_rope_fwd: cos must be 2-D contiguous of shape \(2, 4\)"):
            _compiled.norm_rope_fwd(torch.randn(2, 8), torch.ones(8), cos, cos, 4, 1e-6)

    def test_per_token_gradients(self):
        logits, labels = torch.randn(3, 8), torch.zeros(3, dtype=torch.int64)
        _, _, lse = _compiled.cross_entropy_fwd(logits, labels, -100, 0.0)
        one = torch.ones(3)
        with pytest.raises(ValueError, match=r"cross_entropy_bwd: grad_ce must be 1-D, contiguous or with stride 0"):
            _compiled.cross_entropy_bwd(logits, labels, lse, torch.tensor(1.0), one, -100, 0.0)
        with pytest.raises(TypeError, match="cross_entropy_bwd: grad_z must be float32"):
            _compiled.cross_entropy_bwd(logits, labels, lse, one, one.double(), -100, 0.0)

    def test_out_layout(self):
        logits, labels = torch.randn(3, 8), torch.zeros(3, dtype=torch.int64)
        _, _, lse = _compiled.cross_entropy_fwd(logits, labels, -100, 0.0)
        one = torch.ones(3)
        with pytest.raises(ValueError, match=r"cross_entropy_bwd: out must be 2-D .* of shape \(3, 8\) on cpu"):
            _compiled.cross_entropy_bwd(logits, labels, lse, one, one, -100, 0.0, out=torch.empty(8, 3).t())


# --------------------------------------------------------------------------- conversions
def _cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    src = src.contiguous()
    dst = torch.empty(src.shape, dtype=dtype)
    C.cpu.cast(src.data_ptr(), _compiled.DTYPE_CODES[src.dtype], dst.data_ptr(), _compiled.DTYPE_CODES[dtype],
               src.numel())
    return dst


def _same_bits_or_both_nan(actual: torch.Tensor, expected: torch.Tensor):
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    int_view = torch.int16 if actual.element_size() == 2 else torch.int32
    a, e = actual.view(int_view), expected.view(int_view)
    mismatch = (a != e) & ~nan
    assert not mismatch.any(), f"{int(mismatch.sum())} mismatches, first at {mismatch.nonzero()[:5].flatten().tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_half_bit_pattern_widens_exactly(dtype):
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    _same_bits_or_both_nan(_cast(halves, torch.float32), halves.to(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_to_half_rounds_to_nearest_even(dtype):
    gen = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    # Every half value, and the midpoints between neighbours (ties) +- 1 ulp of fp32.
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float32)
    halves = halves[halves.isfinite()].unique()
    mids = (halves[1:].double() + halves[:-1].double()) / 2
    mids32 = mids.float()
    near = torch.cat([mids32, torch.nextafter(mids32, torch.tensor(math.inf)), torch.nextafter(mids32, torch.tensor(-math.inf))])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24,
                            2.0**-25, 3 * 2.0**-26, 2.0**-14 - 2.0**-26, 3.4e38, 1.2e-38, 1e-45])
    values = torch.cat([random_bits.view(torch.float32), halves, near, special, -special])
    _same_bits_or_both_nan(_cast(values, dtype), values.to(dtype))


# --------------------------------------------------------------------------- launchers vs the spec
LAYOUTS = ("contiguous", "strided", "misaligned")


def rand(shape, dtype, device, scale=1.0, layout="contiguous"):
    """Random (rows, cols) values inside a NaN-filled buffer, so a kernel that
    reads out of bounds yields NaN. ``contiguous``: rows between two NaN rows;
    ``strided``: row stride cols + 16, start 8 elements in (16-byte aligned when
    cols allows: the CUDA kernels' vector path); ``misaligned``: row stride
    cols + 8 but start 1 element in, so only the pointer's alignment rules the
    vector path out."""
    values = (torch.randn(shape, device=device) * scale).to(dtype)
    if len(shape) != 2:
        return values
    rows, cols = shape
    if layout == "contiguous":
        base = torch.full((rows + 2, cols), math.nan, dtype=dtype, device=device)
        view = base[1:-1]
    else:
        offset, pad = (8, 16) if layout == "strided" else (1, 8)
        base = torch.full((rows, cols + pad), math.nan, dtype=dtype, device=device)
        view = base[:, offset:offset + cols]
    view.copy_(values)
    return view


# (33, 2049): scalar path (odd width); (3, 5000) and (2, 40000): rows too wide
# for the CUDA kernels' registers, so they take the re-reading loops.
ROW_SHAPES = [(1, 1), (7, 200), (33, 2049), (300, 96), (3, 5000), (2, 40000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rms_norm(device, dtype, shape, layout):
    x = rand(shape, dtype, device, scale=3.0, layout=layout)
    w = rand((shape[1],), dtype, device)
    dy = rand(shape, dtype, device, layout=layout)
    y, rstd = _compiled.rms_norm_fwd(x, w, 1e-6)
    dx, dw = _compiled.rms_norm_bwd(dy, x, w, rstd)

    x64, w64 = f64_leaf(x), f64_leaf(w)
    y64 = reference.rms_norm(x64, w64, 1e-6)
    y64.backward(dy.double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == w.dtype
    assert y.is_contiguous() and dx.is_contiguous()
    assert_close(y, y64, dtype, name="y")
    assert_close(rstd, torch.rsqrt(x64.detach().pow(2).mean(-1) + 1e-6), torch.float32, name="rstd")
    assert_close(dx, x64.grad, dtype, name="dx")
    assert_close(dw, w64.grad, dtype, reduction=shape[0], name="dweight")


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16])
def test_rms_norm_mixed_weight_dtype(device, w_dtype):
    x = rand((17, 130), torch.bfloat16, device)
    w = rand((130,), w_dtype, device)
    dy = rand((17, 130), torch.bfloat16, device)
    y, rstd = _compiled.rms_norm_fwd(x, w, 1e-5)
    dx, dw = _compiled.rms_norm_bwd(dy, x, w, rstd)
    x64, w64 = f64_leaf(x), f64_leaf(w)
    y64 = reference.rms_norm(x64, w64, 1e-5)
    y64.backward(dy.double())
    assert dw.dtype == w_dtype
    assert_close(y, y64, torch.bfloat16, name="y")
    assert_close(dx, x64.grad, torch.bfloat16, name="dx")
    assert_close(dw, w64.grad, torch.bfloat16, reduction=17, name="dweight")


def test_rms_norm_bwd_deterministic(device):
    x = rand((513, 1000), torch.float32, device)
    w = rand((1000,), torch.float32, device)
    dy = rand((513, 1000), torch.float32, device)
    _, rstd = _compiled.rms_norm_fwd(x, w, 1e-6)
    first = _compiled.rms_norm_bwd(dy, x, w, rstd)
    second = _compiled.rms_norm_bwd(dy, x, w, rstd)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_rms_norm_zero_rows(device):
    w = torch.randn(64, device=device)
    y, rstd = _compiled.rms_norm_fwd(torch.empty(0, 64, device=device), w, 1e-6)
    assert y.shape == (0, 64) and rstd.shape == (0,)
    dx, dw = _compiled.rms_norm_bwd(torch.empty(0, 64, device=device), torch.empty(0, 64, device=device), w, rstd)
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros_like(w))


def _ref_norm_rope(x, w, cos, sin, head_dim, eps):
    """The spec for one projection (reference.qk_norm_rope normalizes q and k alike)."""
    return reference.qk_norm_rope(x, x, w, w, cos, sin, head_dim, eps)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, seq, heads, head_dim",
    [(1, 1, 1, 2), (2, 7, 3, 16), (3, 5, 1, 128), (1, 33, 4, 64), (2, 3, 5, 10)],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_norm_rope(device, dtype, batch, seq, heads, head_dim, layout):
    from olmo2_kernels.qk_norm_rope import rope_cos_sin

    width = heads * head_dim
    rows = batch * seq
    x = rand((rows, width), dtype, device, scale=2.0, layout=layout)
    w = rand((width,), dtype, device)
    dy = rand((rows, width), dtype, device, layout=layout)
    cos, sin = rope_cos_sin(seq, head_dim, theta=10_000.0, device=device)
    y, rstd = _compiled.norm_rope_fwd(x, w, cos, sin, head_dim, 1e-6)
    dx, dw = _compiled.norm_rope_bwd(dy, x, w, rstd, cos, sin, head_dim)

    x64, w64 = f64_leaf(x), f64_leaf(w)
    y64 = _ref_norm_rope(x64.view(batch, seq, width), w64, cos.double(), sin.double(), head_dim, 1e-6)
    y64.backward(dy.double().view(batch, seq, width))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y64.view(rows, width), dtype, name="y")
    assert_close(dx, x64.grad, dtype, name="dx")
    assert_close(dw, w64.grad, dtype, reduction=rows, name="dweight")


def test_norm_rope_general_tables(device):
    """cos/sin need not be duplicated halves: the kernels use each entry as given."""
    rows, seq, head_dim, width = 12, 4, 8, 24
    x = rand((rows, width), torch.float32, device)
    w = rand((width,), torch.float32, device)
    dy = rand((rows, width), torch.float32, device)
    cos = torch.randn(seq, head_dim, device=device)
    sin = torch.randn(seq, head_dim, device=device)
    y, rstd = _compiled.norm_rope_fwd(x, w, cos, sin, head_dim, 1e-6)
    dx, dw = _compiled.norm_rope_bwd(dy, x, w, rstd, cos, sin, head_dim)
    x64, w64 = f64_leaf(x), f64_leaf(w)
    y64 = _ref_norm_rope(x64.view(3, seq, width), w64, cos.double(), sin.double(), head_dim, 1e-6)
    y64.backward(dy.double().view(3, seq, width))
    assert_close(y, y64.view(rows, width), torch.float32, name="y")
    assert_close(dx, x64.grad, torch.float32, name="dx")
    assert_close(dw, w64.grad, torch.float32, reduction=rows, name="dweight")


def _ref_cross_entropy(logits, labels, ignore_index, coef, grad_ce, grad_z):
    """Per-token ce, z, lse and dlogits of sum(grad_ce * ce + grad_z * z) from the spec in float64."""
    x64 = f64_leaf(logits)
    ce, z = reference.cross_entropy(x64, labels, ignore_index, coef, reduction="none")
    (ce * grad_ce.double() + z * grad_z.double()).sum().backward()
    return ce.detach(), z.detach(), torch.logsumexp(x64.detach(), -1), x64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(1, 1), (7, 200), (16, 4096 + 7), (5, 2 * 2048 + 1)])
@pytest.mark.parametrize("coef", [0.0, 1e-2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cross_entropy(device, dtype, rows, vocab, coef, layout):
    logits = rand((rows, vocab), dtype, device, scale=4.0, layout=layout)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[::3] = -100
    grad_ce = torch.randn(rows, device=device)
    grad_z = torch.randn(rows, device=device)
    ce, z, lse = _compiled.cross_entropy_fwd(logits, labels, -100, coef)
    dlogits = _compiled.cross_entropy_bwd(logits, labels, lse, grad_ce, grad_z, -100, coef)

    ce64, z64, lse64, dx64 = _ref_cross_entropy(logits, labels, -100, coef, grad_ce, grad_z)
    assert ce.dtype == z.dtype == lse.dtype == torch.float32 and dlogits.dtype == dtype
    assert_close(lse, lse64, torch.float32, name="lse")
    assert_close(ce, ce64, torch.float32, name="ce")
    assert_close(z, z64, torch.float32, name="z")
    ignored = labels == -100
    assert torch.equal(ce[ignored], torch.zeros_like(ce[ignored]))
    if coef == 0.0:
        assert torch.equal(z, torch.zeros_like(z)), "z-loss must be exactly 0 when its coefficient is 0"
    assert_close(dlogits, dx64, dtype, name="dlogits")
    assert torch.equal(dlogits[ignored], torch.zeros_like(dlogits[ignored]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_in_place_and_broadcast_grads(device, dtype):
    rows, vocab = 9, 1000
    logits = rand((rows, vocab), dtype, device, scale=3.0)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[2] = 7
    ce, z, lse = _compiled.cross_entropy_fwd(logits, labels, 7, 1e-4)
    grad = torch.tensor(0.25, device=device).expand(rows)  # e.g. d(mean)/d(ce): one scalar for every token, stride 0
    _, _, _, dx64 = _ref_cross_entropy(logits, labels, 7, 1e-4, grad, grad)
    buffer = logits.clone()
    out = _compiled.cross_entropy_bwd(buffer, labels, lse, grad, grad, 7, 1e-4, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert_close(buffer, dx64, dtype, name="dlogits in place")
    assert torch.equal(buffer[2], torch.zeros_like(buffer[2])), "ignore_index may lie inside [0, V)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_confident_target_keeps_precision(device, dtype):
    """p(target) = 0.999: the target gradient p - 1 = -1e-3 must keep its digits
    (computed in fp32 from the lse, whatever the logits' dtype)."""
    vocab, p = 50, 0.999
    logits = torch.full((1, vocab), -8.0, device=device)
    logits[0, 3] = math.log(p) - math.log(1 - p) + math.log(vocab - 1) - 8.0
    logits = logits.to(dtype)
    labels = torch.tensor([3], device=device)
    ce, _, lse = _compiled.cross_entropy_fwd(logits, labels, -100, 0.0)
    one, zero = torch.ones(1, device=device), torch.zeros(1, device=device)
    d = _compiled.cross_entropy_bwd(logits, labels, lse, one, zero, -100, 0.0)
    _, _, _, dx64 = _ref_cross_entropy(logits, labels, -100, 0.0, one, zero)
    expected = dx64[0, 3].item()
    assert -2e-3 < expected < -5e-4
    rel = 1e-3 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output (2^-9)
    assert abs(d[0, 3].item() - expected) < rel * abs(expected)


def test_cross_entropy_out_of_range_label_is_nan(device):
    logits = torch.randn(4, 30, device=device)
    labels = torch.tensor([1, 30, -5, -100], device=device)
    ce, z, lse = _compiled.cross_entropy_fwd(logits, labels, -100, 1e-4)
    assert ce[0].isfinite() and ce[1].isnan() and ce[2].isnan() and ce[3] == 0
    assert lse.isfinite().all()
    g = torch.ones(4, device=device)
    d = _compiled.cross_entropy_bwd(logits, labels, lse, g, g, -100, 1e-4)
    assert d[0].isfinite().all() and d[1].isnan().all() and d[2].isnan().all() and (d[3] == 0).all()


def test_cross_entropy_extreme_logits(device):
    logits = torch.randn(4, 5000, device=device)
    logits[0, :] = -math.inf
    logits[0, 17] = 0.0  # one finite entry
    logits[1, 4000:] = -math.inf  # a -inf tail
    logits[2, 123] = math.nan
    logits[3] *= 1e4  # large range: exp underflows for most entries
    labels = torch.tensor([17, 5, 6, 7], device=device)
    ce, _, lse = _compiled.cross_entropy_fwd(logits, labels, -100, 0.0)
    expected = torch.logsumexp(logits.double(), -1)
    assert lse[0].item() == 0.0 and ce[0].item() == 0.0
    assert_close(lse[[1, 3]], expected[[1, 3]], torch.float32, name="lse")
    assert lse[2].isnan()


def test_cross_entropy_all_ignored(device):
    logits = torch.randn(3, 10, device=device)
    labels = torch.full((3,), -100, device=device)
    ce, z, lse = _compiled.cross_entropy_fwd(logits, labels, -100, 1e-4)
    g = torch.ones(3, device=device)
    d = _compiled.cross_entropy_bwd(logits, labels, lse, g, g, -100, 1e-4)
    assert (ce == 0).all() and (z == 0).all() and (d == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 199), (64, 2049), (3, 40000)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_swiglu(device, dtype, shape, layout):
    gate = rand(shape, dtype, device, scale=4.0, layout=layout)
    up = rand(shape, dtype, device, layout=layout)
    dy = rand(shape, dtype, device)
    y = _compiled.swiglu_fwd(gate, up)
    dgate, dup = _compiled.swiglu_bwd(dy, gate, up)
    g64, u64 = f64_leaf(gate), f64_leaf(up)
    y64 = reference.swiglu(g64, u64)
    y64.backward(dy.double())
    assert y.dtype == dgate.dtype == dup.dtype == dtype
    assert_close(y, y64, dtype, name="y")
    assert_close(dgate, g64.grad, dtype, name="dgate")
    assert_close(dup, u64.grad, dtype, name="dup")


def test_swiglu_extreme_gates(device):
    gate = torch.tensor([[-1e4, -100.0, -88.0, -30.0, 0.0, 30.0, 88.0, 100.0, 1e4]], device=device)
    up = torch.full_like(gate, 1.5)
    y = _compiled.swiglu_fwd(gate, up)
    dgate, dup = _compiled.swiglu_bwd(torch.ones_like(gate), gate, up)
    g64, u64 = f64_leaf(gate), f64_leaf(up)
    reference.swiglu(g64, u64).sum().backward()
    assert_close(y, reference.swiglu(gate.double(), up.double()), torch.float32, name="y")
    assert_close(dgate, g64.grad, torch.float32, name="dgate")
    assert_close(dup, u64.grad, torch.float32, name="dup")


# --------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
def test_cuda_int64_offsets():
    """Rows past 2^31 elements: the last rows must be right (int32 offsets would wrap)."""
    width = 4096
    rows = 2**31 // width + 3
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    tail = slice(rows - 3, rows)
    y, rstd = _compiled.rms_norm_fwd(x, w, 1e-6)
    assert_close(y[tail], reference.rms_norm(x[tail].double(), w.double()), torch.bfloat16, name="rms tail")
    g = _compiled.swiglu_fwd(x, x)
    assert_close(g[tail], reference.swiglu(x[tail].double(), x[tail].double()), torch.bfloat16, name="swiglu tail")
    del g, y
    labels = torch.randint(0, width, (rows,), device="cuda")
    ce, _, lse = _compiled.cross_entropy_fwd(x, labels, -100, 0.0)
    ce64, _ = reference.cross_entropy(x[tail].double(), labels[tail], reduction="none")
    assert_close(ce[tail], ce64, torch.float32, name="ce tail")


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
def test_cuda_misaligned_views_use_the_scalar_path():
    """Views offset by one element cannot take 16-byte loads; results must not change."""
    base = torch.randn(9, 4097, device="cuda", dtype=torch.bfloat16)
    x = base[:, 1:]
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    y, _ = _compiled.rms_norm_fwd(x, w, 1e-6)
    assert_close(y, reference.rms_norm(x.double(), w.double()), torch.bfloat16, name="y")
    g = _compiled.swiglu_fwd(x, base[:, :-1])
    assert_close(g, reference.swiglu(x.double(), base[:, :-1].double()), torch.bfloat16, name="swiglu")
