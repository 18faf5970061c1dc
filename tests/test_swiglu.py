"""swiglu: forward and both gradients against the float64 spec on every backend, and input checks."""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import olmo2_kernels
from olmo2_kernels import reference
from conftest import device_for, skip_reason
from tolerances import assert_close, f64_leaf

OP = "swiglu"
DTYPES = (torch.float32, torch.bfloat16)


def check(gate, up):
    """Run the op, backprop a random upstream gradient, compare with the spec."""
    dtype = gate.dtype
    gate = gate.detach().requires_grad_(True)
    up = up.detach().requires_grad_(True)
    y = olmo2_kernels.swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape
    dy = torch.randn_like(y)
    y.backward(dy)

    gate64, up64 = f64_leaf(gate), f64_leaf(up)
    reference.swiglu(gate64, up64).backward(dy.to(torch.float64))
    assert_close(y, reference.swiglu(gate64, up64), dtype, name="y")
    assert_close(gate.grad, gate64.grad, dtype, name="dgate")
    assert_close(up.grad, up64.grad, dtype, name="dup")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 200), (3, 5, 2049), (4099,)])
def test_forward_backward(backend, device, dtype, shape):
    check(torch.randn(shape, device=device, dtype=dtype) * 4, torch.randn(shape, device=device, dtype=dtype))


# Under the Triton interpreter numpy warns where exp overflows to inf, as it does
# silently on a GPU; sigmoid = 1 / (1 + inf) = 0 is then the exact limit.
OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@OVERFLOW_OK
def test_extreme_gate_values(backend, device):
    """Saturated sigmoid on both sides: no NaN or overflow, exact limits."""
    gate = torch.tensor([[-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4]], device=device)
    check(gate, torch.randn_like(gate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(backend, device, dtype):
    # gate and up as the two halves of a fused gate/up projection output: read in place
    fused = torch.randn(3, 7, 2 * 200, device=device, dtype=dtype)
    gate, up = fused.chunk(2, dim=-1)
    check(gate, up)
    # different layouts for gate and up: transposed, strided columns
    check(torch.randn(200, 7, device=device, dtype=dtype).t(), torch.randn(7, 399, device=device, dtype=dtype)[:, ::2])
    # a broadcast (stride 0) up
    check(torch.randn(5, 33, device=device, dtype=dtype), torch.randn(33, device=device, dtype=dtype).expand(5, 33))


def test_non_contiguous_upstream_gradient(backend, device):
    gate = torch.randn(7, 200, device=device, requires_grad=True)
    up = torch.randn(7, 200, device=device, requires_grad=True)
    y = olmo2_kernels.swiglu(gate, up)
    dy = torch.randn(200, 7, device=device).t()
    y.backward(dy)
    gate64, up64 = f64_leaf(gate), f64_leaf(up)
    reference.swiglu(gate64, up64).backward(dy.double())
    assert_close(gate.grad, gate64.grad, torch.float32, name="dgate")
    assert_close(up.grad, up64.grad, torch.float32, name="dup")


def test_empty(backend, device):
    for shape in [(0,), (0, 7), (7, 0)]:
        gate = torch.randn(shape, device=device, requires_grad=True)
        up = torch.randn(shape, device=device, requires_grad=True)
        y = olmo2_kernels.swiglu(gate, up)
        y.sum().backward()
        assert y.shape == shape and gate.grad.shape == shape and up.grad.shape == shape


def test_does_not_write_inputs(backend, device):
    gate, up = torch.randn(7, 200, device=device), torch.randn(7, 200, device=device)
    gate_copy, up_copy = gate.clone(), up.clone()
    y = olmo2_kernels.swiglu(gate.requires_grad_(True), up.requires_grad_(True))
    y.backward(torch.randn(7, 200, device=device))
    assert torch.equal(gate.detach(), gate_copy) and torch.equal(up.detach(), up_copy)


@OVERFLOW_OK
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 20),
    width=st.integers(1, 5000),
    bf16=st.booleans(),
    scale=st.floats(1e-3, 1e2),
)
def test_fuzz_shapes(backend, device, rows, width, bf16, scale):
    dtype = torch.bfloat16 if bf16 else torch.float32
    gate = (torch.randn(rows, width, device=device) * scale).to(dtype)
    check(gate, torch.randn(rows, width, device=device, dtype=dtype))


def test_compile_fullgraph(backend, device):
    fused = torch.randn(5, 2 * 99, device=device, requires_grad=True)
    dy = torch.randn(5, 99, device=device)
    fn = torch.compile(lambda h: olmo2_kernels.swiglu(*h.chunk(2, dim=-1)) * dy, fullgraph=True, backend="aot_eager")
    y = fn(fused)
    y.sum().backward()
    fused64 = f64_leaf(fused)
    y64 = reference.swiglu(*fused64.chunk(2, dim=-1)) * dy.double()
    y64.sum().backward()
    assert_close(y, y64, torch.float32, name="y")
    assert_close(fused.grad, fused64.grad, torch.float32, name="dfused")


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="swiglu: gate must be a torch.Tensor"):
            olmo2_kernels.swiglu([1.0], torch.ones(1))
        with pytest.raises(TypeError, match="swiglu: up must be a torch.Tensor"):
            olmo2_kernels.swiglu(torch.ones(1), 1.0)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="swiglu: gate must have dtype"):
            olmo2_kernels.swiglu(torch.ones(4, dtype=torch.int64), torch.ones(4))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="swiglu: up must have the dtype of gate"):
            olmo2_kernels.swiglu(torch.ones(4), torch.ones(4, dtype=torch.bfloat16))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"swiglu: up must have shape \(2, 4\)"):
            olmo2_kernels.swiglu(torch.ones(2, 4), torch.ones(4))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="swiglu: up is on meta but gate is on cpu"):
            olmo2_kernels.swiglu(torch.ones(4), torch.ones(4, device="meta"))

    def test_zero_dim(self):
        with pytest.raises(ValueError, match="swiglu: gate must have at least 1 dim"):
            olmo2_kernels.swiglu(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a tensor past 2^31 elements")
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_int64_offsets(gpu_backend):
    reason = __import__("conftest").skip_reason(gpu_backend, OP)
    if reason:
        pytest.skip(reason)
    width = 8192
    rows = 2**31 // width + 3
    gate = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with olmo2_kernels.use_backend(gpu_backend):
        y = olmo2_kernels.swiglu(gate, up)
        dy = torch.randn_like(y)
        y.backward(dy)
    tail = slice(rows - 3, rows)
    gate64, up64 = gate[tail].detach().double().requires_grad_(True), up[tail].detach().double().requires_grad_(True)
    y64 = reference.swiglu(gate64, up64)
    y64.backward(dy[tail].double())
    assert_close(y[tail], y64, torch.bfloat16, name="tail rows")
    assert_close(gate.grad[tail], gate64.grad, torch.bfloat16, name="tail rows dgate")
    assert_close(up.grad[tail], up64.grad, torch.bfloat16, name="tail rows dup")


# --------------------------------------------------------------------------- the GPU's tilings
swiglu_module = importlib.import_module("olmo2_kernels.swiglu")


@pytest.mark.parametrize(
    "shape, tile",
    [
        ((2, 8192), (1, 4096, 8, 4)),  # OLMo 2 1B intermediate: (BLOCK_R, BLOCK_C, warps, programs)
        ((3, 5003), (1, 4096, 8, 6)),
        ((37, 200), (16, 256, 8, 3)),  # short rows share a program
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tiling(shape, tile, dtype, monkeypatch):
    """The launchers' production tilings, recorded and run under the interpreter against the spec."""
    from launches import RecordLaunches

    if skip_reason("triton", OP):
        pytest.skip(skip_reason("triton", OP))
    device = device_for("triton")
    gate = torch.randn(shape, device=device, dtype=dtype)
    up = torch.randn(shape, device=device, dtype=dtype)
    recorder = RecordLaunches(monkeypatch, swiglu_module)
    with olmo2_kernels.use_backend("triton"):
        check(gate, up)
    calls = [{"kernel": launch.kernel, "grid": launch.grid, **launch.meta} for launch in recorder.launches]
    assert [(c["BLOCK_R"], c["BLOCK_C"], c["num_warps"], c["grid"][0]) for c in calls] == [tile, tile]
