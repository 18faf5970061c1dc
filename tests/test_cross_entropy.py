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
from conftest import device_for, skip_reason
from launches import RecordLaunches
from olmo2_kernels import _triton, reference
from tolerances import assert_close, f64_leaf, tolerance

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
@pytest.mark.parametrize("shape", [(1, 96), (7, 200), (300, 200), (9, 2049), (5, 5003)])
def test_forward_backward(backend, device, dtype, shape):
    # 5003 is wider than the kernels' column blocks: two Triton blocks, which
    # the launcher splits across two programs at so few rows (more slices and
    # slices of several blocks: test_production_tiling). (300, 200): 16-row
    # tiles, the last one partial.
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
    logits = torch.randn(37, 200, device=device) * 4
    labels = make_labels(37, 200, device)
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


# --------------------------------------------------------------------------- the GPU's tiling
# The Triton kernels run here at the tiles a GPU gets (the interpreter included:
# nothing depends on TRITON_INTERPRET), on small inputs. sm_count sizes the
# vocabulary split: 132 SMs (an H100's, the default off CUDA) or 1 (target of
# 32 programs), to reach each path with a few rows.
needs_triton = pytest.mark.skipif(skip_reason("triton", OP) is not None, reason="backend 'triton' unavailable")
TRITON_DEVICE = device_for("triton")
FWD, COMBINE, BWD = "_cross_entropy_fwd_kernel", "_cross_entropy_fwd_combine_kernel", "_cross_entropy_bwd_kernel"

# (SMs, N, V) -> the row kernels' (ROWS, BLOCK, num_warps), slices per row;
# run in fp32 and bf16 (the two 1-SM cases, 32 programs each, in one dtype each).
PRODUCTION_TILINGS = {
    # one program per row, V = 2 blocks streamed by one program (32 rows reach
    # the 32 programs per SM of one SM)
    (1, 32, 4097): (1, 4096, 8, 1),
    # 3 rows: each row split into its 3 blocks (S = 3), partials combined
    (132, 3, 9001): (1, 4096, 8, 3),
    # slices of 2 blocks: 8 rows x 8 blocks / 32 -> 2 blocks each, S = 4, the last
    # slice one full block and 5 columns
    (1, 8, 7 * 4096 + 5): (1, 4096, 8, 4),
    # narrow vocabularies: 16 rows of 256 columns (the last tile partial), 8 rows of 128
    (132, 37, 200): (16, 256, 8, 1),
    (132, 7, 96): (8, 128, 4, 1),
}


def cdiv(a, b):
    return -(-a // b)


def check_launches(rec, n, v, tiling):
    rows, block, warps, slices = tiling
    (fwd,), bwd = rec.of(FWD), rec.of(BWD)
    assert fwd.grid == (cdiv(n, rows), slices)
    assert (fwd.meta["ROWS"], fwd.meta["BLOCK"], fwd.meta["num_warps"]) == (rows, block, warps)
    assert fwd.meta["SPLIT"] == (slices > 1)
    assert len(rec.of(COMBINE)) == (slices > 1)
    for launch in bwd:
        assert launch.grid == fwd.grid
        assert (launch.meta["ROWS"], launch.meta["BLOCK"], launch.meta["num_warps"]) == (rows, block, warps)


@needs_triton
@pytest.mark.parametrize("sms, n, v, dtype", [
    (sms, n, v, dtype) for (sms, n, v) in PRODUCTION_TILINGS for dtype in DTYPES
    if sms > 1 or dtype == (torch.float32 if n == 32 else torch.bfloat16)
])
def test_production_tiling(monkeypatch, dtype, sms, n, v):
    """Forward and backward at the GPU's tiles against the float64 spec, and
    the launcher's choice of those tiles, recorded."""
    rec = RecordLaunches(monkeypatch, ce_module)
    logits = (torch.randn(n, v, device=TRITON_DEVICE) * 3).to(dtype)
    with olmo2_kernels.use_backend("triton"), _triton.assume_sm_count(sms):
        check(logits, make_labels(n, v, TRITON_DEVICE, ignore_every=3), reduction="none", z_loss_coef=1e-3)
    check_launches(rec, n, v, PRODUCTION_TILINGS[(sms, n, v)])
    assert all(launch.meta["HAS_Z"] for launch in rec.launches)


# OLMo 2's vocabulary at the row counts it is called with: chunks of the fused
# linear cross-entropy (1B: 256 and 512 rows at 8192 and 16384 tokens; 7B: 512
# and 1024) and the plain cross-entropy (8192 rows). The table of the module
# docstring.
TRAINING_SPLITS = {256: 25, 512: 9, 1024: 5, 8192: 1}


@needs_triton
@pytest.mark.parametrize("n", list(TRAINING_SPLITS))
def test_launch_plan_at_training_sizes(monkeypatch, n):
    """On meta tensors (nothing runs): H100-sized launches fill the GPU."""
    v = 100352
    rec = RecordLaunches(monkeypatch, ce_module, run=False)
    logits = torch.empty(n, v, dtype=torch.float32, device="meta")
    labels = torch.empty(n, dtype=torch.int64, device="meta")
    with _triton.assume_sm_count(132):
        _ce, _z, lse = ce_module._fwd_triton(logits, labels, -100, 1e-4)
        ce_module._bwd_triton(logits, labels, lse, lse, lse, -100, 1e-4)
    slices = TRAINING_SPLITS[n]
    check_launches(rec, n, v, (1, 4096, 8, slices))
    programs = rec.of(FWD)[0].programs
    assert programs == n * slices and programs >= ce_module.TARGET_PROGRAMS_PER_SM * 132
    # The slices are whole blocks and together exactly the vocabulary.
    got_slices, cols = ce_module.vocab_split(n, v, 4096, torch.device("meta"))
    assert got_slices == slices and cols % 4096 == 0 and (slices - 1) * cols < v <= slices * cols
    if slices > 1:
        (combine,) = rec.of(COMBINE)
        assert combine.meta["SLICES"] >= slices


def test_no_tiling_depends_on_the_interpreter():
    assert "TRITON_INTERPRET" not in open(ce_module.__file__).read()


# --------------------------------------------------------------------------- the contract
# The per-row contract of the row kernels (module docstring of cross_entropy),
# evaluated in float64 on the kernels' own inputs (for the backward: the lse
# the forward saved, in fp32), so each clause is checked exactly.
def contract_forward(logits, labels, ignore_index, coef):
    x = logits.double()
    n, v = x.shape
    lse = torch.logsumexp(x, -1)  # NaN if any NaN, else +inf if any +inf, -inf if all -inf
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    target = x.gather(1, labels.clamp(0, v - 1)[:, None])[:, 0]
    nan = torch.full_like(lse, float("nan"))
    ce = torch.where(valid, torch.where(in_range, lse - target, nan), 0.0)
    z = torch.where(valid, coef * lse * lse, 0.0) if coef != 0 else torch.zeros_like(lse)
    return ce, z, lse


def contract_backward(logits, labels, lse, g_ce, g_z, ignore_index, coef):
    x = logits.double()
    n, v = x.shape
    lse, g_ce, g_z = lse.double()[:, None], g_ce.double()[:, None], g_z.double()[:, None]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    t = x - lse
    p = torch.exp(t)
    z_scale = 2 * coef * lse * g_z if coef != 0 else torch.zeros_like(lse)
    d = (g_ce + z_scale) * p
    label = labels.clamp(0, v - 1)[:, None]
    t_label = t.gather(1, label)
    d_label = g_ce * torch.expm1(t_label) + z_scale * torch.exp(t_label)
    d = d.scatter(1, label, d_label)
    d = torch.where(valid[:, None] & ~in_range[:, None], float("nan"), d)
    return torch.where(valid[:, None], d, 0.0)


def assert_contract(actual, expected, dtype, name):
    """Same NaN and +-inf entries; finite ones within the tolerance of ``dtype``."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{name}: NaN entries differ"
    inf = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), inf), f"{name}: inf entries differ"
    assert torch.equal(actual[inf], expected[inf]), f"{name}: inf entries differ in sign"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], **tolerance(dtype), msg=lambda m: f"{name}: {m}")


def contract_rows(v, device):
    """One row per clause; the special values in the last block of the row
    (another slice than the label's when the vocabulary is split)."""
    torch.manual_seed(1)
    n = 12
    x = torch.randn(n, v, device=device) * 2
    labels = torch.randint(0, min(v, 64), (n,), device=device)
    last = v - 3
    labels[1] = -100                      # ignored
    labels[2] = v                         # out of range, above
    labels[3] = -7                        # out of range, below
    x[4, last] = float("nan")             # a NaN: lse NaN
    x[5, last] = float("inf")             # a +inf: lse +inf (label elsewhere)
    x[6] = float("-inf")                  # all -inf: lse -inf
    x[7] = float("-inf")
    labels[7] = -100                      # ... ignored: ce = z = 0, gradient 0
    x[8, v // 2:] = float("-inf")         # masked vocabulary
    labels[8] = 0
    x[9, labels[9]] = x[9].amax() + 12    # confident: p(label) = 1 - O(V e^-12)
    x[10, last] = float("inf")
    x[10, 0] = float("nan")               # +inf and NaN: NaN
    x[11, last] = float("inf")            # the +inf is the label
    labels[11] = last
    return x, labels


@needs_triton
# The interpreter evaluates these rows in numpy, which warns about the inf and
# NaN arithmetic the contract asks for.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("z_loss_coef", [0.0, 0.1])
@pytest.mark.parametrize("v", [200, 9001])
def test_contract(monkeypatch, v, z_loss_coef):
    """Every clause of the forward and the backward, one row each; at V = 9001
    the vocabulary is split (3 slices), so the partials are combined."""
    rec = RecordLaunches(monkeypatch, ce_module)
    x, labels = contract_rows(v, TRITON_DEVICE)
    ce, z, lse = ce_module._fwd_triton(x, labels, -100, z_loss_coef)
    want_ce, want_z, want_lse = contract_forward(x, labels, -100, z_loss_coef)
    assert_contract(lse, want_lse, torch.float32, "lse")
    assert_contract(ce, want_ce, torch.float32, "ce")
    assert_contract(z, want_z, torch.float32, "z")
    assert torch.isnan(lse[[4, 10]]).all() and lse[5] == float("inf") and lse[6] == float("-inf")
    assert ce[1] == 0 and z[1] == 0 and ce[7] == 0 and z[7] == 0
    assert torch.isnan(ce[2]) and torch.isnan(ce[3]) and torch.isfinite(z[2])
    if z_loss_coef == 0:
        assert (z == 0).all(), "coefficient 0: z is exactly 0, even where lse is +-inf or NaN"
    else:
        assert z[2] == z_loss_coef * lse[2] * lse[2]

    g_ce, g_z = torch.randn(12, device=x.device), torch.randn(12, device=x.device)
    g_ce[[1, 7]] = float("nan")  # ignored rows: zeros whatever their upstream gradient
    d = ce_module._bwd_triton(x, labels, lse, g_ce, g_z, -100, z_loss_coef)
    want = contract_backward(x, labels, lse, g_ce, g_z, -100, z_loss_coef)
    assert_contract(d, want, torch.float32, "dlogits")
    assert (d[[1, 7]] == 0).all() and torch.isnan(d[[2, 3]]).all()
    assert len(rec.of(COMBINE)) == (v > 4096)


@needs_triton
@pytest.mark.parametrize("v", [200, 9001])
def test_target_gradient_is_expm1(v):
    """d_label = g * expm1(x_label - lse): at p(label) = 1 - 1e-6 an fp32
    ``p - 1`` is off by up to 6e-8 / 1e-6 = 6%. Given the lse (its fp32 values
    taken as exact), the kernel's target gradient is within 4 units of 2^-24
    of the float64 contract, relatively."""
    n = 4
    x = torch.full((n, v), -30.0, device=TRITON_DEVICE)
    labels = torch.tensor([0, 5, v - 1, 17], device=TRITON_DEVICE)
    x[torch.arange(n), labels] = 0.0
    # lse = -t with t = -1e-6, -3e-5, -1e-3, -0.3 (as fp32)
    lse = torch.tensor([1e-6, 3e-5, 1e-3, 0.3], device=TRITON_DEVICE)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], device=TRITON_DEVICE)
    zero = torch.zeros(n, device=TRITON_DEVICE)
    d = ce_module._bwd_triton(x, labels, lse, g, zero, -100, 0.0)
    got = d[torch.arange(n), labels].double()
    want = g.double() * torch.expm1(-lse.double())
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=4 * 2**-24, atol=0.0)


# --------------------------------------------------------------------------- expm1
if ce_module.triton is not None:
    _expm1 = ce_module._expm1
    tl = ce_module.tl

    @ce_module.triton.jit
    def _expm1_kernel(T, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        t = tl.load(T + offs, mask=offs < n, other=0.0)
        tl.store(OUT + offs, _expm1(t), mask=offs < n)


@needs_triton
def test_expm1_accuracy():
    """The kernels' fp32 expm1 against float64 on [-30, 0] (tiny |t| included,
    the switch at |t| = 0.5 and small positive t), to 2 fp32 ulps."""
    half = torch.tensor([0.5, -0.5])
    t = torch.cat([
        -torch.logspace(-7, -3, 401), torch.logspace(-7, -3, 401), -torch.linspace(0, 30, 3001),
        half, torch.nextafter(half, torch.zeros(2)), torch.nextafter(half, 2 * half),
        torch.tensor([1e-30, -1e-30, -88.0, -104.0]),
    ]).to(torch.float32).to(TRITON_DEVICE)
    out = torch.empty_like(t)
    _expm1_kernel[(cdiv(t.numel(), 1024),)](t, out, t.numel(), BLOCK=1024)
    want = torch.expm1(t.double().cpu())
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 24)  # of fp32 at want
    worst = ((out.double().cpu() - want).abs() / ulp).max().item()
    assert worst <= 2, f"expm1: {worst:.2f} fp32 ulp"
    specials = torch.tensor([0.0, -0.0, float("-inf"), float("nan")], device=TRITON_DEVICE)
    out = torch.empty_like(specials)
    _expm1_kernel[(1,)](specials, out, 4, BLOCK=4)
    assert out[0] == 0 and out[1] == 0 and out[2] == -1 and torch.isnan(out[3])


# --------------------------------------------------------------------------- out dtype and in place
F32, BF16 = torch.float32, torch.bfloat16


@needs_triton
@pytest.mark.parametrize("n, v, logits_dtype, out_dtype", [
    (3, 9001, F32, BF16),  # 3 slices of a block
    (3, 9001, BF16, F32),
    (3, 9001, F32, F32),
    (37, 200, BF16, BF16),
])
def test_backward_out_dtype_and_in_place(n, v, logits_dtype, out_dtype):
    """``out`` of any float dtype, and ``out`` = the logits (the fused linear
    cross-entropy's buffer), also when the vocabulary is split: the target
    entry is read only by the program that overwrites it. Labels in the first
    and the last slice."""
    logits = (torch.randn(n, v, device=TRITON_DEVICE) * 3).to(logits_dtype)
    labels = torch.randint(0, v, (n,), device=TRITON_DEVICE)
    labels[0], labels[-1] = 0, v - 1
    if n > 3:
        labels[1] = -100
    _ce, _z, lse = ce_module._fwd_triton(logits, labels, -100, 0.1)
    g_ce, g_z = torch.randn(n, device=TRITON_DEVICE), torch.randn(n, device=TRITON_DEVICE)
    out = torch.empty(n, v, dtype=out_dtype, device=TRITON_DEVICE)
    ce_module._bwd_triton(logits, labels, lse, g_ce, g_z, -100, 0.1, out=out)
    want = contract_backward(logits, labels, lse, g_ce, g_z, -100, 0.1)
    assert out.dtype == out_dtype
    assert_contract(out, want, out_dtype, "dlogits")
    if logits_dtype == out_dtype:
        buf = logits.clone()
        ce_module._bwd_triton(buf, labels, lse, g_ce, g_z, -100, 0.1, out=buf)
        assert torch.equal(buf, out), "in place must equal out of place"
