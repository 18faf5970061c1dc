"""cross_entropy: losses and the logits gradient against the float64 spec, on every backend.

Every check backpropagates a random upstream gradient into both outputs (ce and
z), per token for ``reduction="none"``, so gradients computed from the saved
log-sum-exp must be scaled by the incoming gradient.
"""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import olmo2_kernels
from olmo2_kernels import reference
from tolerances import assert_close, f64_leaf

OP = "cross_entropy"
DTYPES = (torch.float32, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
ce_module = importlib.import_module("olmo2_kernels.cross_entropy")


def make_labels(n, v, device, ignore_every=4, ignore_index=-100, dtype=torch.int64):
    """Random labels with every ``ignore_every``-th token (from the second) ignored."""
    labels = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        labels[1::ignore_every] = ignore_index
    return labels.to(dtype)


def check(logits, labels, reduction="none", z_loss_coef=1e-4, ignore_index=-100):
    """Run the op, backprop random upstream gradients into ce and z, compare with the spec.

    Losses are compared with the fp32 tolerance whatever the logits' dtype: the
    kernels compute them in fp32 from the exact input values, as the spec does.
    The gradient is rounded once to the logits' dtype.
    """
    dtype = logits.dtype
    x = logits.detach().requires_grad_(True)
    ce, z = olmo2_kernels.cross_entropy(x, labels, ignore_index, z_loss_coef, reduction)
    assert ce.dtype == torch.float32 and z.dtype == torch.float32
    g_ce, g_z = torch.randn_like(ce), torch.randn_like(z)
    torch.autograd.backward((ce, z), (g_ce, g_z))

    x64 = f64_leaf(x)
    ce64, z64 = reference.cross_entropy(x64, labels, ignore_index, z_loss_coef, reduction)
    torch.autograd.backward((ce64, z64), (g_ce.double(), g_z.double()))
    n = logits.shape[0]
    assert_close(ce, ce64, torch.float32, reduction=n, name="ce")
    assert_close(z, z64, torch.float32, reduction=n, name="z")
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, name="dlogits")
    ignored = labels == ignore_index
    assert (x.grad[ignored] == 0).all(), "ignored rows must get zero gradient"
    return ce, z, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (7, 200), (300, 2049), (5, 5003), (3, 9001)])
def test_forward_backward(backend, device, dtype, shape):
    # 5003 and 9001 are wider than the kernels' column block: the online
    # log-sum-exp runs over two and three blocks.
    n, v = shape
    logits = (torch.randn(shape, device=device) * 3 + 0.5).to(dtype)
    check(logits, make_labels(n, v, device), reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-4, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_z_loss(backend, device, dtype, reduction, z_loss_coef):
    logits = (torch.randn(37, 200, device=device) * 3).to(dtype)
    check(logits, make_labels(37, 200, device), reduction=reduction, z_loss_coef=z_loss_coef)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, device, reduction):
    logits = torch.randn(9, 200, device=device)
    labels = torch.full((9,), -100, device=device)
    ce, z, dlogits = check(logits, labels, reduction=reduction, z_loss_coef=0.1)
    assert (ce == 0).all() and (z == 0).all()
    assert (dlogits == 0).all()


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_custom_ignore_index_and_label_dtypes(backend, device, label_dtype):
    # ignore_index inside [0, V): that class is never a target.
    labels = make_labels(23, 96, device, ignore_every=3, ignore_index=5, dtype=label_dtype)
    logits = torch.randn(23, 96, device=device) * 2
    check(logits, labels, reduction="mean", z_loss_coef=1e-4, ignore_index=5)
    check(logits, make_labels(23, 96, device, dtype=label_dtype), reduction="sum", z_loss_coef=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_rows(backend, device, dtype):
    """The target-class gradient ``grad * (p - 1)`` must not cancel when p is near 1."""
    n, v = 6, 200
    rows = torch.arange(n, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    logits = torch.randn(n, v, device=device) * 0.5
    others = logits.clone()
    others[rows, labels] = float("-inf")
    # p(target) = 0.999 in the first rows: a softmax rounded to bf16 gives 1
    # there and a zero gradient. The last two rows are +30 above the rest
    # (p = 1 - 1e-11: the gradient is about 0 and must stay finite).
    logits[rows, labels] = torch.logsumexp(others, -1) + torch.log(torch.tensor(999.0, device=device))
    logits[rows[-2:], labels[-2:]] = logits[-2:].amax(-1) + 30
    logits = logits.to(dtype)
    _, _, dlogits = check(logits, labels, reduction="none", z_loss_coef=0.0)

    # The absolute tolerance alone would let a zero through for the target
    # entries (about -1e-3 times the upstream gradient): check them relatively.
    x = logits.detach().requires_grad_(True)
    x64 = f64_leaf(logits)
    g = torch.randn(n, device=device)
    olmo2_kernels.cross_entropy(x, labels, reduction="none")[0].backward(g)
    reference.cross_entropy(x64, labels, reduction="none")[0].backward(g.double())
    got = x.grad[rows, labels][:-2].double().cpu()
    want = x64.grad[rows, labels][:-2].cpu()
    assert (want.abs() > 1e-5).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.0)


def test_z_loss_off_is_plain_cross_entropy(backend, device):
    logits = torch.randn(37, 2049, device=device) * 4
    labels = make_labels(37, 2049, device)
    for reduction in REDUCTIONS:
        ce0, z0 = olmo2_kernels.cross_entropy(logits, labels, z_loss_coef=0.0, reduction=reduction)
        ce1, z1 = olmo2_kernels.cross_entropy(logits, labels, z_loss_coef=1e-4, reduction=reduction)
        assert torch.equal(ce0, ce1), "the z-loss must not leak into the cross-entropy"
        assert (z0 == 0).all() and (z1 != 0).any()
    # and its gradient is exactly the plain cross-entropy's
    check(logits, labels, reduction="mean", z_loss_coef=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_logits_not_written(backend, device, dtype):
    wide = (torch.randn(40, 2 * 200 + 7, device=device) * 3).to(dtype)
    row_strided = wide[::3, 7:207]  # row stride, unit column stride: no copy needed
    col_strided = (torch.randn(200, 13, device=device) * 3).to(dtype).t()  # column stride: copied
    for logits in (row_strided, col_strided):
        before = logits.clone()
        check(logits, make_labels(logits.shape[0], 200, device), reduction="mean", z_loss_coef=1e-4)
        assert torch.equal(logits, before), "the op must not write into the logits"


def test_backward_of_one_output(backend, device):
    """Backprop through ce alone (z unused) and through z alone."""
    logits = torch.randn(11, 96, device=device) * 2
    labels = make_labels(11, 96, device)
    for which in (0, 1):
        x = logits.clone().requires_grad_(True)
        olmo2_kernels.cross_entropy(x, labels, z_loss_coef=0.1)[which].backward()
        x64 = f64_leaf(logits)
        reference.cross_entropy(x64, labels, z_loss_coef=0.1)[which].backward()
        assert_close(x.grad, x64.grad, torch.float32, name=f"dlogits from output {which}")


# The interpreter computes log(0) and 0 * inf for the fully masked row in numpy
# (values that the kernels then discard), and numpy warns.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_minus_inf_logits(backend, device):
    """Masked vocabulary entries (-inf) get zero probability and gradient."""
    logits = torch.randn(5, 96, device=device) * 2
    logits[:, 90:] = float("-inf")
    labels = torch.randint(0, 90, (5,), device=device)
    labels[3] = -100
    _, _, dlogits = check(logits, labels, reduction="sum", z_loss_coef=1e-4)
    assert (dlogits[:, 90:] == 0).all()
    # A fully masked row that is ignored gives 0 loss and 0 gradient, not NaN
    # (the spec's own gradient is NaN there: 0 * d(lse^2) at lse = -inf, so
    # the torch backend, which is the spec, is not held to it).
    if backend == "torch":
        return
    logits[3] = float("-inf")
    x = logits.clone().requires_grad_(True)
    ce, z = olmo2_kernels.cross_entropy(x, labels, z_loss_coef=1e-4, reduction="none")
    (ce + z).sum().backward()
    assert ce[3] == 0 and z[3] == 0 and torch.isfinite(ce).all()
    assert (x.grad[3] == 0).all() and torch.isfinite(x.grad).all()


def test_empty_batch(backend, device):
    logits = torch.randn(0, 96, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64, device=device)
    ce, z = olmo2_kernels.cross_entropy(logits, labels, z_loss_coef=1e-4)
    assert ce.item() == 0 and z.item() == 0
    (ce + z).backward()
    assert logits.grad.shape == (0, 96)


def test_kernel_out_of_range_label_gives_nan(backend, device):
    """Without the host-side range check (CUDA), a bad label must not read out
    of bounds: its token's ce is NaN, the others are unaffected."""
    if backend == "torch":
        pytest.skip("the torch backend has no row kernel (its gather raises instead)")
    logits = torch.randn(4, 96, device=device)
    labels = torch.tensor([3, 96, -7, -100], device=device)
    ce, z, lse = ce_module._FWD[backend](logits, labels, -100, 1e-4)
    assert torch.isnan(ce[1]) and torch.isnan(ce[2])
    assert ce[3] == 0 and z[3] == 0
    want = torch.logsumexp(logits[0].double(), 0) - logits[0, 3].double()
    assert_close(ce[0], want, torch.float32, name="ce of the valid row")


def test_row_backward_into_out(backend, device):
    """The row backward writes into ``out`` when given, which may be the logits
    buffer itself (as the fused linear cross-entropy does); the Triton launcher
    also rounds fp32 logits' gradient straight to a bf16 ``out``."""
    if backend == "torch":
        pytest.skip("the torch backend has no row kernel")
    logits = torch.randn(21, 200, device=device) * 3
    labels = make_labels(21, 200, device)
    ce, z, lse = ce_module._FWD[backend](logits, labels, -100, 0.1)
    g_ce, g_z = torch.randn(21, device=device), torch.randn(21, device=device)
    args = (labels, lse, g_ce, g_z, -100, 0.1)
    want = ce_module._BWD[backend](logits, *args)
    buf = logits.clone()
    assert ce_module._BWD[backend](buf, *args, out=buf).data_ptr() == buf.data_ptr()
    assert torch.equal(buf, want)
    if backend == "triton":
        low = torch.empty(21, 200, dtype=torch.bfloat16, device=device)
        ce_module._BWD[backend](logits, *args, out=low)
        # Rounded once from fp32: within one bf16 ulp (the interpreter truncates
        # where the GPU rounds to nearest).
        torch.testing.assert_close(low.float(), want, rtol=2**-7, atol=0.0)


def test_labels_out_of_range_raise():
    logits = torch.randn(4, 96)
    for bad in (96, -1):
        labels = torch.tensor([0, 1, bad, -100])
        with pytest.raises(ValueError, match=r"cross_entropy: labels must be in \[0, 96\)"):
            olmo2_kernels.cross_entropy(logits, labels)


def test_compile_fullgraph(backend, device):
    logits = (torch.randn(13, 200, device=device) * 3).requires_grad_(True)
    labels = make_labels(13, 200, device, ignore_every=3)

    def loss_fn(x, y):
        ce, z = olmo2_kernels.cross_entropy(x, y, z_loss_coef=1e-2)
        return ce + z

    fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = fn(logits, labels)
    loss.backward()
    x64 = f64_leaf(logits)
    ce64, z64 = reference.cross_entropy(x64, labels, z_loss_coef=1e-2)
    (ce64 + z64).backward()
    assert_close(loss, ce64 + z64, torch.float32, name="loss")
    assert_close(logits.grad, x64.grad, torch.float32, name="dlogits")
    assert (logits.grad[labels == -100] == 0).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    v=st.integers(1, 300),
    ignored=st.floats(0.0, 1.0),
    bf16=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_fuzz_shapes(backend, device, n, v, ignored, bf16, reduction):
    dtype = torch.bfloat16 if bf16 else torch.float32
    logits = (torch.randn(n, v, device=device) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignored] = -100
    check(logits, labels, reduction=reduction, z_loss_coef=1e-3)


class TestBadInput:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="cross_entropy: logits must be a torch.Tensor"):
            olmo2_kernels.cross_entropy([[1.0, 2.0]], torch.zeros(1, dtype=torch.int64))

    def test_integer_logits(self):
        with pytest.raises(TypeError, match="cross_entropy: logits must have dtype"):
            olmo2_kernels.cross_entropy(torch.ones(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))

    def test_float_labels(self):
        with pytest.raises(TypeError, match="cross_entropy: labels must have dtype"):
            olmo2_kernels.cross_entropy(torch.ones(2, 4), torch.zeros(2))

    def test_logits_1d(self):
        with pytest.raises(ValueError, match="cross_entropy: logits must have at least 2 dim"):
            olmo2_kernels.cross_entropy(torch.ones(4), torch.zeros(1, dtype=torch.int64))

    def test_logits_3d(self):
        with pytest.raises(ValueError, match=r"cross_entropy: logits must be 2-D \(N, V\)"):
            olmo2_kernels.cross_entropy(torch.ones(2, 3, 4), torch.zeros(6, dtype=torch.int64))

    def test_no_classes(self):
        with pytest.raises(ValueError, match="cross_entropy: logits must have at least one class"):
            olmo2_kernels.cross_entropy(torch.ones(2, 0), torch.zeros(2, dtype=torch.int64))

    def test_label_length(self):
        with pytest.raises(ValueError, match=r"cross_entropy: labels must have shape \(3,\)"):
            olmo2_kernels.cross_entropy(torch.ones(3, 4), torch.zeros(2, dtype=torch.int64))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="cross_entropy: labels is on meta but the inputs are on cpu"):
            olmo2_kernels.cross_entropy(torch.ones(3, 4), torch.zeros(3, dtype=torch.int64, device="meta"))

    def test_reduction(self):
        with pytest.raises(ValueError, match="cross_entropy: reduction must be one of"):
            olmo2_kernels.cross_entropy(torch.ones(3, 4), torch.zeros(3, dtype=torch.int64), reduction="avg")

    def test_negative_z_loss_coef(self):
        with pytest.raises(ValueError, match="cross_entropy: z_loss_coef must be a non-negative number"):
            olmo2_kernels.cross_entropy(torch.ones(3, 4), torch.zeros(3, dtype=torch.int64), z_loss_coef=-1e-4)

    def test_ignore_index_type(self):
        with pytest.raises(TypeError, match="cross_entropy: ignore_index must be an int"):
            olmo2_kernels.cross_entropy(torch.ones(3, 4), torch.zeros(3, dtype=torch.int64), ignore_index=-100.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: logits past 2^31 elements")
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_int64_offsets(gpu_backend):
    reason = __import__("conftest").skip_reason(gpu_backend, OP)
    if reason:
        pytest.skip(reason)
    vocab = 100352
    rows = (2**31) // vocab + 3
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    with olmo2_kernels.use_backend(gpu_backend):
        ce, _ = olmo2_kernels.cross_entropy(logits, labels, reduction="none")
        ce[-3:].sum().backward()
    tail = slice(rows - 3, rows)
    x64 = f64_leaf(logits[tail])
    ce64, _ = reference.cross_entropy(x64, labels[tail], reduction="none")
    ce64.sum().backward()
    assert_close(ce[tail], ce64, torch.float32, name="ce of the tail rows")
    assert_close(logits.grad[tail], x64.grad, torch.bfloat16, name="dlogits of the tail rows")
