"""rms_norm: forward and both gradients against the float64 spec, on every backend."""
import importlib
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import olmo2_kernels
from olmo2_kernels import reference
from tolerances import assert_close, f64_leaf
from conftest import device_for, skip_reason

OP = "rms_norm"
DTYPES = (torch.float32, torch.bfloat16)


def check(x, weight, eps=1e-6, weight_dtype=None):
    """Run the op on x/weight, backprop a random upstream gradient, compare with the spec."""
    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    y = olmo2_kernels.rms_norm(x, weight, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64 = f64_leaf(x), f64_leaf(weight)
    y64 = reference.rms_norm(x64, w64, eps)
    y64.backward(dy.to(torch.float64))
    rows = x.numel() // x.shape[-1]
    assert_close(y, y64, dtype, name="y")
    assert_close(x.grad, x64.grad, dtype, name="dx")
    assert weight.grad.dtype == weight.dtype
    assert_close(weight.grad, w64.grad, weight_dtype or dtype, reduction=rows, name="dweight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (7, 200), (300, 2049), (2, 3, 96), (5, 1)])
def test_forward_backward(backend, device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 3 + 0.5
    weight = torch.randn(shape[-1], device=device, dtype=dtype)
    check(x, weight)


def test_fp32_weight_bf16_input(backend, device):
    x = torch.randn(33, 200, device=device, dtype=torch.bfloat16)
    weight = torch.randn(200, device=device, dtype=torch.float32)
    check(x, weight, weight_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(backend, device, dtype):
    base = torch.randn(40, 2 * 96 + 5, device=device, dtype=dtype)
    check(base[::3, 5::2], torch.randn(96, device=device, dtype=dtype))  # strided rows and columns
    check(torch.randn(96, 13, device=device, dtype=dtype).t(), torch.randn(96, device=device, dtype=dtype))


def test_large_eps_and_zero_rows(backend, device):
    x = torch.zeros(4, 64, device=device)
    check(x, torch.randn(64, device=device), eps=1e-2)
    y = olmo2_kernels.rms_norm(torch.empty(0, 64, device=device), torch.ones(64, device=device))
    assert y.shape == (0, 64)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 40),
    width=st.integers(1, 300),
    bf16=st.booleans(),
    scale=st.floats(1e-3, 1e3),
)
def test_fuzz_shapes(backend, device, rows, width, bf16, scale):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = (torch.randn(rows, width, device=device) * scale).to(dtype)
    check(x, torch.randn(width, device=device, dtype=dtype))


def test_module_drop_in(backend, device):
    norm = olmo2_kernels.RMSNorm(200, eps=1e-6, device=device)
    x = torch.randn(3, 5, 200, device=device)
    assert_close(norm(x), reference.rms_norm(x.double(), norm.weight.double()), torch.float32, name="module")


def test_compile_fullgraph(backend, device):
    x = torch.randn(7, 200, device=device, requires_grad=True)
    w = torch.randn(200, device=device, requires_grad=True)
    fn = torch.compile(lambda x, w: olmo2_kernels.rms_norm(x, w) * 2.0, fullgraph=True, backend="aot_eager")
    y = fn(x, w)
    y.sum().backward()
    x64, w64 = f64_leaf(x), f64_leaf(w)
    (reference.rms_norm(x64, w64) * 2.0).sum().backward()
    assert_close(y, reference.rms_norm(x64, w64) * 2.0, torch.float32, name="y")
    assert_close(x.grad, x64.grad, torch.float32, name="dx")
    assert_close(w.grad, w64.grad, torch.float32, reduction=7, name="dweight")


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="rms_norm: x must be a torch.Tensor"):
            olmo2_kernels.rms_norm([1.0, 2.0], torch.ones(2))

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="rms_norm: x must have dtype"):
            olmo2_kernels.rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4))

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(8,\)"):
            olmo2_kernels.rms_norm(torch.ones(2, 8), torch.ones(7))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="rms_norm: weight is on meta but x is on cpu"):
            olmo2_kernels.rms_norm(torch.ones(2, 8), torch.ones(8, device="meta"))

    def test_eps(self):
        with pytest.raises(ValueError, match="rms_norm: eps must be a positive number"):
            olmo2_kernels.rms_norm(torch.ones(2, 8), torch.ones(8), eps=0.0)

    def test_zero_dim(self):
        with pytest.raises(ValueError, match="rms_norm: x must have at least 1 dim"):
            olmo2_kernels.rms_norm(torch.tensor(1.0), torch.ones(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a tensor past 2^31 elements")
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_int64_offsets(gpu_backend):
    reason = __import__("conftest").skip_reason(gpu_backend, OP)
    if reason:
        pytest.skip(reason)
    width = 4096
    rows = (2**31) // width + 3
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    with olmo2_kernels.use_backend(gpu_backend):
        y = olmo2_kernels.rms_norm(x, w)
    tail = slice(rows - 3, rows)
    assert_close(y[tail], reference.rms_norm(x[tail].double(), w.double()), torch.bfloat16, name="tail rows")


# --------------------------------------------------------------------------- the GPU's tilings
# The interpreter runs the same constexprs, warps and partitions as an H100
# (sm_count is 132 off CUDA); these tests pin them and check the paths that
# only wide rows or many rows per program reach, on small inputs.
rms_module = importlib.import_module("olmo2_kernels.rms_norm")  # the package exports the function under this name


@pytest.mark.parametrize(
    "width, fwd, bwd",
    [
        # width: (kernel, BLOCK, num_warps) forward, then backward
        (2048, ("_rms_norm_fwd_kernel", 2048, 8), ("_rms_norm_bwd_kernel", 2048, 16)),  # 1B
        (4096, ("_rms_norm_fwd_kernel", 4096, 16), ("_rms_norm_bwd_kernel", 4096, 32)),  # 7B
        (5120, ("_rms_norm_fwd_kernel", 8192, 32), ("_rms_norm_bwd_kernel", 8192, 32)),  # 13B, 32B
        (9000, ("_rms_norm_fwd_kernel", 16384, 32), ("_rms_norm_bwd_stream_kernel", 4096, 32)),
        (20000, ("_rms_norm_fwd_stream_kernel", 4096, 16), ("_rms_norm_bwd_stream_kernel", 4096, 32)),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tiling(width, fwd, bwd, dtype, monkeypatch):
    """The launchers' production tilings, run under the interpreter against the spec."""
    from launches import RecordLaunches

    if skip_reason("triton", OP):
        pytest.skip(skip_reason("triton", OP))
    device = device_for("triton")
    x = torch.randn(3, width, device=device, dtype=dtype)
    weight = torch.randn(width, device=device, dtype=dtype)
    recorder = RecordLaunches(monkeypatch, rms_module)
    with olmo2_kernels.use_backend("triton"):
        check(x, weight)
    calls = [{"kernel": launch.kernel, "grid": launch.grid, **launch.meta} for launch in recorder.launches]
    got = [(c["kernel"], c["BLOCK"], c["num_warps"]) for c in calls]
    assert got == [fwd, bwd]


@pytest.mark.parametrize("width", [200, 20000])
def test_many_rows_per_program(width):
    """Fewer SMs than rows: each backward program loops over several rows, the last one fewer."""
    from olmo2_kernels._triton import assume_sm_count

    if skip_reason("triton", OP):
        pytest.skip(skip_reason("triton", OP))
    device = device_for("triton")
    with olmo2_kernels.use_backend("triton"), assume_sm_count(1):
        check(torch.randn(10, width, device=device), torch.randn(width, device=device))
