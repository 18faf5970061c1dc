"""The cross-entropy row contract (the "Row contract" of
:func:`olmo2_kernels.reference.cross_entropy`), clause by clause, forward and
backward, on every row backend: ``triton`` (the interpreter without a GPU),
``cpu`` (the extension, and each other instruction set it was built for),
``cuda-emulated`` (the CUDA kernels compiled for the host, tests/cuda_emulation.py),
``cuda`` on a GPU, and ``torch`` (the spec run as is) where the spec defines the
clause.

The row launchers are called directly (``cross_entropy._FWD/_BWD``,
``_compiled.cross_entropy_fwd/bwd``): the public op checks label ranges on CPU,
which would keep out-of-range labels from ever reaching a kernel.

Expected values come from ``contract_fwd``/``contract_bwd`` below, the contract
transcribed literally in float64 (non-finite values included); a first test
checks that on finite rows they are the float64 spec. The backward is fed the
backend's own fp32 lse, so each direction is measured on its own. Logits sit in
NaN-padded buffers with a row stride (a read or write past a row shows), and
V = 4096 and 5003 stream the vocabulary through several blocks of every kernel
(Triton: 4096 columns, CPU: 2048, CUDA: one pass per 1024 threads), 5003 also
through the CUDA kernels' scalar path.
"""
import importlib
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import cuda_emulation
from olmo2_kernels import _backend, _compiled, _extension, reference
from tolerances import tolerance

ce_module = importlib.import_module("olmo2_kernels.cross_entropy")
# The Triton interpreter computes inf - inf and log(0) in NumPy for the non-finite rows, as the contract says.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]

OP = "cross_entropy"
DTYPES = (torch.float32, torch.bfloat16)
DTYPE_IDS = ("fp32", "bf16")
VOCABS = (4096, 5003)
IGNORE = -100
C = _extension.module()
HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_KERNELS = HAS_CUDA and _extension.has_cuda_kernels()
OTHER_CPU_ISAS = [isa for isa in C.cpu.isas() if isa != C.cpu.isa()] if C is not None else []


# --------------------------------------------------------------------------- the contract in float64
def contract_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_coef: float):
    """(ce, z, lse) per row, float64, from the exact input values."""
    x = logits.double()
    vocab = x.shape[1]
    nan = torch.tensor(math.nan, dtype=torch.float64, device=x.device)
    lse = torch.logsumexp(x, -1)
    lse = torch.where((x == math.inf).any(-1), math.inf, lse)
    lse = torch.where(x.isnan().any(-1), nan, lse)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    target = x.gather(1, labels.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    ce = torch.where(ignored, 0.0, torch.where(in_range, lse - target, nan))
    z = torch.zeros_like(lse) if z_coef == 0 else torch.where(ignored, 0.0, z_coef * lse * lse)
    return ce, z, lse


def contract_bwd(logits, labels, lse, g_ce, g_z, ignore_index: int, z_coef: float) -> torch.Tensor:
    """dlogits, float64, from the given lse and per-token upstream gradients."""
    x = logits.double()
    vocab = x.shape[1]
    lse, g_ce, g_z = lse.double().unsqueeze(1), g_ce.double().unsqueeze(1), g_z.double().unsqueeze(1)
    t = x - lse
    p = torch.exp(t)
    z_scale = 2 * z_coef * lse * g_z if z_coef != 0 else torch.zeros_like(lse)
    d = (g_ce + z_scale) * p
    is_target = torch.arange(vocab, device=x.device).unsqueeze(0) == labels.unsqueeze(1)
    d = torch.where(is_target, g_ce * torch.expm1(t) + z_scale * p, d)
    ignored = (labels == ignore_index).unsqueeze(1)
    out_of_range = ((labels < 0) | (labels >= vocab)).unsqueeze(1) & ~ignored
    d = torch.where(out_of_range, math.nan, d)
    return torch.where(ignored, 0.0, d)


def assert_matches(actual, expected, dtype, name, **tol):
    """``actual`` (computed in ``dtype``) against the float64 contract: NaN and
    +-inf where expected, finite values within the tolerance table's bound."""
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), equal_nan=True,
        **(tol or tolerance(dtype)), msg=lambda m: f"{name} ({dtype}): {m}",
    )


def assert_zero(t, name):
    assert torch.equal(t, torch.zeros_like(t)), f"{name}: expected exact zeros, got {t}"


# --------------------------------------------------------------------------- row backends
@dataclass
class RowKernels:
    name: str
    device: torch.device
    fwd: Callable  # (logits, labels, ignore_index, z_coef) -> (ce, z, lse)
    bwd: Callable  # (logits, labels, lse, g_ce, g_z, ignore_index, z_coef, out=None) -> dlogits

    def spec_undefined(self, why: str) -> None:
        """Skip the torch backend for a clause the spec (reference.cross_entropy) does not define."""
        if self.name == "torch":
            pytest.skip(f"torch: not defined by the spec ({why})")


def _torch_fwd(logits, labels, ignore_index, z_coef):
    ce, z = reference.cross_entropy(logits, labels, ignore_index, z_coef, reduction="none")
    return ce, z, torch.logsumexp(logits.to(reference.accumulation_dtype(logits.dtype)), -1)


def _torch_bwd(logits, labels, lse, g_ce, g_z, ignore_index, z_coef, out=None):
    assert out is None, "the spec has no out buffer"
    x = logits.detach().requires_grad_(True)
    ce, z = reference.cross_entropy(x, labels, ignore_index, z_coef, reduction="none")
    torch.autograd.backward((ce, z), (g_ce, g_z))
    return x.grad


ROW_BACKENDS = (
    ["torch", "triton", "cpu"] + [f"cpu-{isa}" for isa in OTHER_CPU_ISAS] + ["cuda-emulated"]
    + (["cuda"] if HAS_CUDA_KERNELS else [])
)


@pytest.fixture(params=ROW_BACKENDS)
def rows(request, monkeypatch) -> RowKernels:
    name = request.param
    gpu = torch.device("cuda" if HAS_CUDA else "cpu")
    if name == "torch":
        return RowKernels(name, gpu, _torch_fwd, _torch_bwd)
    if name == "triton":
        reason = _backend.unavailable_reason("triton", gpu.type, OP)
        if reason:
            pytest.skip(f"triton unavailable: {reason}")
        return RowKernels(name, gpu, ce_module._FWD["triton"], ce_module._BWD["triton"])
    compiled = RowKernels(name, torch.device("cpu"), _compiled.cross_entropy_fwd, _compiled.cross_entropy_bwd)
    if name == "cuda-emulated":
        reason = cuda_emulation.unavailable_reason()
        if reason:
            pytest.skip(reason)
        kernels = cuda_emulation.kernels(request.getfixturevalue("tmp_path_factory").mktemp("cuda_emulation"))
        monkeypatch.setattr(_compiled, "_kernels", lambda op, device: (kernels, 0))
        return compiled
    if C is None:
        pytest.skip(f"extension not loaded: {_extension.load_error()}")
    if name.startswith("cpu-"):
        previous = C.cpu.isa()
        C.cpu.set_isa(name[len("cpu-"):])
        request.addfinalizer(lambda: C.cpu.set_isa(previous))
    if name == "cuda":
        compiled.device = torch.device("cuda")
    return compiled


# --------------------------------------------------------------------------- inputs
def padded(values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (N, V) as a view with row stride V + 16 starting 8 elements into
    a NaN-filled buffer (16-byte aligned for every dtype when V allows: the CUDA
    vector path)."""
    dtype = dtype or values.dtype
    n, v = values.shape
    base = torch.full((n, v + 16), math.nan, dtype=dtype, device=values.device)
    view = base[:, 8:8 + v]
    view.copy_(values.to(dtype))
    return view


def random_logits(n, vocab, dtype, device):
    return padded(torch.randn(n, vocab, device=device) * 3 + 0.5, dtype)


def upstream(n, device):
    return torch.randn(n, device=device), torch.randn(n, device=device)


def run(rows: RowKernels, logits, labels, ignore_index, z_coef, g_ce=None, g_z=None):
    """Forward and backward of one backend; the backward from the forward's lse."""
    if g_ce is None:
        g_ce, g_z = upstream(logits.shape[0], logits.device)
    ce, z, lse = rows.fwd(logits, labels, ignore_index, z_coef)
    d = rows.bwd(logits, labels, lse, g_ce, g_z, ignore_index, z_coef)
    return ce, z, lse, d, g_ce, g_z


def check_against_contract(logits, labels, ignore_index, z_coef, ce, z, lse, d, g_ce, g_z, grad_dtype=None):
    e_ce, e_z, e_lse = contract_fwd(logits, labels, ignore_index, z_coef)
    assert ce.dtype == z.dtype == lse.dtype == torch.float32
    assert_matches(lse, e_lse, torch.float32, "lse")
    assert_matches(ce, e_ce, torch.float32, "ce")
    assert_matches(z, e_z, torch.float32, "z")
    grad_dtype = grad_dtype or logits.dtype
    assert d.dtype == grad_dtype and d.shape == logits.shape
    assert_matches(d, contract_bwd(logits, labels, lse, g_ce, g_z, ignore_index, z_coef), grad_dtype, "dlogits")


# --------------------------------------------------------------------------- the contract is the spec
@pytest.mark.parametrize("z_coef", [0.0, 0.1])
def test_contract_is_the_spec_on_finite_rows(z_coef):
    """On finite rows with labels in range or ignored, the float64 transcription
    of the contract is the float64 spec, forward and backward."""
    x = torch.randn(9, 300, dtype=torch.float64) * 4
    labels = torch.randint(0, 300, (9,))
    labels[::3] = IGNORE
    g_ce, g_z = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    x64 = x.clone().requires_grad_(True)
    ce64, z64 = reference.cross_entropy(x64, labels, IGNORE, z_coef, reduction="none")
    torch.autograd.backward((ce64, z64), (g_ce, g_z))
    ce, z, lse = contract_fwd(x, labels, IGNORE, z_coef)
    tol = tolerance(torch.float64)
    torch.testing.assert_close(ce, ce64.detach(), **tol)
    torch.testing.assert_close(z, z64.detach(), **tol)
    torch.testing.assert_close(contract_bwd(x, labels, lse, g_ce, g_z, IGNORE, z_coef), x64.grad, **tol)


# --------------------------------------------------------------------------- valid and ignored rows
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_valid_and_ignored_rows(rows, dtype, vocab):
    """ce = lse - x[label], z = coef lse^2, the softmax gradient; ignored rows:
    ce = z = 0 and a zero gradient row, lse still written."""
    n = 6
    logits = random_logits(n, vocab, dtype, rows.device)
    labels = torch.tensor([0, IGNORE, vocab - 1, 4097 % vocab, IGNORE, 1234], device=rows.device)
    ce, z, lse, d, g_ce, g_z = run(rows, logits, labels, IGNORE, 0.1)
    check_against_contract(logits, labels, IGNORE, 0.1, ce, z, lse, d, g_ce, g_z)
    ignored = labels == IGNORE
    assert_zero(ce[ignored], "ce of ignored rows")
    assert_zero(z[ignored], "z of ignored rows")
    assert_zero(d[ignored], "dlogits of ignored rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ignore_index_inside_the_vocabulary(rows, dtype):
    vocab, ignore_index = 5003, 3
    logits = random_logits(4, vocab, dtype, rows.device)
    labels = torch.tensor([3, 5, 3, 4000], device=rows.device)
    ce, z, lse, d, g_ce, g_z = run(rows, logits, labels, ignore_index, 0.1)
    check_against_contract(logits, labels, ignore_index, 0.1, ce, z, lse, d, g_ce, g_z)
    assert_zero(ce[[0, 2]], "ce of ignored rows")
    assert_zero(d[[0, 2]], "dlogits of ignored rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ignored_rows_with_non_finite_logits(rows, dtype):
    """An ignored row is 0 loss and a zero gradient whatever its logits hold."""
    rows.spec_undefined("autograd multiplies the zero upstream gradient by exp(NaN)")
    vocab = 5003
    values = torch.randn(4, vocab, device=rows.device)
    values[0, 4100] = math.nan
    values[1] = -math.inf
    values[2, 7] = math.inf
    logits = padded(values, dtype)
    labels = torch.tensor([IGNORE, IGNORE, IGNORE, 5], device=rows.device)
    ce, z, lse, d, g_ce, g_z = run(rows, logits, labels, IGNORE, 0.1)
    check_against_contract(logits, labels, IGNORE, 0.1, ce, z, lse, d, g_ce, g_z)
    assert_zero(ce[:3], "ce of ignored rows")
    assert_zero(z[:3], "z of ignored rows")
    assert_zero(d[:3], "dlogits of ignored rows")


# --------------------------------------------------------------------------- out-of-range labels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("z_coef", [0.0, 0.1])
def test_out_of_range_label(rows, dtype, z_coef):
    """ce = NaN, z as for a valid row, a NaN gradient row; other rows unaffected."""
    rows.spec_undefined("the spec reads logits[label]; range checks keep such labels out of the op")
    vocab = 5003
    logits = random_logits(6, vocab, dtype, rows.device)
    labels = torch.tensor([vocab, -5, 17, IGNORE, 2**40, -(2**40)], device=rows.device)
    ce, z, lse, d, g_ce, g_z = run(rows, logits, labels, IGNORE, z_coef)
    check_against_contract(logits, labels, IGNORE, z_coef, ce, z, lse, d, g_ce, g_z)
    bad = torch.tensor([True, True, False, False, True, True], device=rows.device)
    assert ce[bad].isnan().all() and lse.isfinite().all()
    assert d[bad].isnan().all(), "a row with an out-of-range label must get a NaN gradient row"
    assert d[2].isfinite().all()
    assert_zero(d[3], "dlogits of the ignored row")
    if z_coef == 0:
        assert_zero(z, "z with z_coef = 0")


# --------------------------------------------------------------------------- non-finite logits
def special_rows(vocab, device):
    """Rows: +inf early (first block), +inf late (last block), +inf at the label,
    NaN in the second block, NaN at the label, every logit -inf, a finite row."""
    values = torch.randn(7, vocab, device=device)
    values[0, 5] = math.inf
    values[1, vocab - 2] = math.inf
    values[2, 100] = math.inf
    values[3, 4100] = math.nan
    values[4, 9] = math.nan
    values[5] = -math.inf
    labels = torch.tensor([11, 12, 100, 13, 9, 14, 15], device=device)
    return values, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_logits(rows, dtype):
    """lse: +inf with a +inf logit, NaN with a NaN one, -inf when all are -inf;
    ce, z and the gradient follow from the formulas (coef != 0)."""
    vocab = 5003
    values, labels = special_rows(vocab, rows.device)
    logits = padded(values, dtype)
    ce, z, lse, d, g_ce, g_z = run(rows, logits, labels, IGNORE, 0.1)
    check_against_contract(logits, labels, IGNORE, 0.1, ce, z, lse, d, g_ce, g_z)
    assert lse[:3].eq(math.inf).all() and lse[3:5].isnan().all() and lse[5] == -math.inf
    assert lse[6].isfinite()
    assert ce[3:5].isnan().all() and ce[5].isnan()
    assert d[3:6].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_z_coef_zero_with_non_finite_lse(rows, dtype):
    """z_coef = 0: z is exactly 0 even where lse is +-inf or NaN, and g_z adds
    nothing to the gradient (not 0 * inf = NaN)."""
    rows.spec_undefined("autograd of logsumexp over a row with an infinite logit is NaN")
    vocab = 5003
    values, labels = special_rows(vocab, rows.device)
    logits = padded(values, dtype)
    g_ce, g_z = upstream(len(labels), rows.device)
    ce, z, lse, d, _, _ = run(rows, logits, labels, IGNORE, 0.0, g_ce, g_z)
    check_against_contract(logits, labels, IGNORE, 0.0, ce, z, lse, d, g_ce, g_z)
    assert_zero(z, "z with z_coef = 0")
    without_z = rows.bwd(logits, labels, lse, g_ce, torch.zeros_like(g_z), IGNORE, 0.0)
    torch.testing.assert_close(d, without_z, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"g_z changed the gradient with z_coef = 0: {m}")
    # +inf rows: exp(-inf) = 0 away from the +inf logit, -g_ce at a finite label.
    assert (d[0, :5] == 0).all() and d[0, 5].isnan() and (d[0, 6:11] == 0).all()
    assert_matches(d[0, 11], -g_ce[0].double(), dtype, "target of a +inf row")


# --------------------------------------------------------------------------- confident rows
def _close_to_rounding(actual, expected, dtype) -> bool:
    """|actual - expected| within a few fp32 roundings, or one ulp of bf16 (the
    Triton interpreter casts fp32 to bf16 by truncation), relative, no atol."""
    rtol = 8 * 2.0**-24 if dtype == torch.float32 else 2.0**-7
    return bool(((actual.double() - expected).abs() <= rtol * expected.abs()).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_confident_row_target_gradient(request, rows, dtype, vocab):
    """Target logit 30 above the rest: 1 - p = (V - 1) e^-30, about 4e-10. The
    target gradient g_ce * expm1(x_label - lse) keeps every digit; p - 1 in
    fp32 is exactly 0. The target logit is 0 so that lse (about 4e-10) keeps
    those digits in fp32; lse is the float64 value rounded once."""
    if rows.name == "torch":
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="the torch backend's autograd takes softmax - onehot in fp32 (p - 1 cancels)"))
    values = torch.full((2, vocab), -30.0, device=rows.device)
    labels = torch.tensor([1, vocab - 1], device=rows.device)
    values[0, 1] = values[1, vocab - 1] = 0.0
    logits = padded(values, dtype)
    x64 = logits.double()
    lse = torch.logsumexp(x64, -1).float()
    g_ce = torch.tensor([1.0, -0.7], device=rows.device)
    g_z = torch.zeros(2, device=rows.device)
    d = rows.bwd(logits, labels, lse, g_ce, g_z, IGNORE, 0.0)

    lse64 = torch.logsumexp(x64, -1)
    expected = g_ce.double() * torch.expm1(-lse64)  # x_label = 0
    actual = d[torch.arange(2), labels]
    assert _close_to_rounding(actual, expected, dtype), f"target gradient {actual.tolist()} != {expected.tolist()}"
    # The check has teeth: the p - 1 formula in fp32 fails it.
    p_minus_1 = g_ce * (torch.exp(values[torch.arange(2), labels] - lse) - 1)
    assert not _close_to_rounding(p_minus_1.to(dtype), expected, dtype)
    assert_matches(d, contract_bwd(logits, labels, lse, g_ce, g_z, IGNORE, 0.0), dtype, "dlogits")


# --------------------------------------------------------------------------- the out buffer
ULP_RTOL = {torch.float32: tolerance(torch.float32)["rtol"], torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
     (torch.bfloat16, torch.float16)],
    ids=["fp32-to-bf16", "fp32-to-fp16", "bf16-to-fp32", "bf16-to-fp16"],
)
@pytest.mark.parametrize("vocab", VOCABS)
def test_out_of_another_dtype(rows, dtype, out_dtype, vocab):
    """The gradient rounded once from fp32 to out's dtype, whatever the logits'
    dtype, into a strided out (its padding untouched). Compared with the float64
    contract within one ulp of out's dtype (fp32: the tolerance table), so a
    rounding through the logits' dtype fails."""
    rows.spec_undefined("the spec returns the gradient in the logits' dtype")
    n = 5
    logits = random_logits(n, vocab, dtype, rows.device)
    labels = torch.tensor([3, IGNORE, vocab - 1, 2**40, 4095], device=rows.device)
    buffer = torch.full((n, vocab + 40), math.nan, dtype=out_dtype, device=rows.device)
    out = buffer[:, 24:24 + vocab]
    g_ce, g_z = upstream(n, rows.device)
    ce, z, lse = rows.fwd(logits, labels, IGNORE, 0.1)
    d = rows.bwd(logits, labels, lse, g_ce, g_z, IGNORE, 0.1, out=out)
    assert d.data_ptr() == out.data_ptr() and d.dtype == out_dtype
    expected = contract_bwd(logits, labels, lse, g_ce, g_z, IGNORE, 0.1)
    assert_matches(d, expected, out_dtype, "dlogits", rtol=ULP_RTOL[out_dtype], atol=2.0**-24)
    assert_zero(d[1], "dlogits of the ignored row")
    assert d[3].isnan().all()
    assert buffer[:, :24].isnan().all() and buffer[:, 24 + vocab:].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_out_aliases_logits(rows, dtype, vocab):
    """out = the (strided) logits buffer itself: each element read before it is written."""
    rows.spec_undefined("the spec has no out buffer")
    logits = random_logits(4, vocab, dtype, rows.device)
    labels = torch.tensor([IGNORE, 0, vocab - 1, 2500], device=rows.device)
    g_ce, g_z = upstream(4, rows.device)
    ce, z, lse = rows.fwd(logits, labels, IGNORE, 0.1)
    expected = contract_bwd(logits, labels, lse, g_ce, g_z, IGNORE, 0.1)
    d = rows.bwd(logits, labels, lse, g_ce, g_z, IGNORE, 0.1, out=logits)
    assert d.data_ptr() == logits.data_ptr()
    assert_matches(logits, expected, dtype, "dlogits in place")
    assert_zero(logits[0], "dlogits of the ignored row")
    assert logits._base[:, :8].isnan().all() and logits._base[:, 8 + vocab:].isnan().all(), "wrote outside the rows"


def test_spec_z_is_exactly_zero_with_zero_coef():
    """The spec itself: z_coef = 0 gives z = 0 (not 0 * inf = NaN) for rows with an
    infinite or NaN lse, and a zero gradient through z."""
    logits = torch.tensor([[0.0, float("inf"), 1.0], [0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    ce, z = reference.cross_entropy(logits, labels, IGNORE, 0.0, reduction="none")
    assert (z == 0).all() and z.requires_grad
    z.sum().backward()
    assert (logits.grad == 0).all()
