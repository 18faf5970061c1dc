"""linear_cross_entropy: losses and the hidden and weight gradients against the
float64 spec, chunked, on every backend; and its peak memory, which must grow
with the chunk size, not with the number of tokens."""
import gc
import importlib

import pytest
import torch

import olmo2_kernels
from conftest import device_for, skip_reason
from launches import RecordLaunches
from memtrack import PeakAllocations
from olmo2_kernels import _triton, reference
from tolerances import assert_close, f64_leaf

OP = "linear_cross_entropy"
DTYPES = (torch.float32, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
lce_module = importlib.import_module("olmo2_kernels.linear_cross_entropy")
ce_module = importlib.import_module("olmo2_kernels.cross_entropy")


def make_inputs(n, h, v, device, dtype, ignore_every=4, ignore_index=-100, label_dtype=torch.int64):
    # Logits of standard deviation about 2.
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) * 2 / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        labels[1::ignore_every] = ignore_index
    return hidden, weight, labels.to(label_dtype)


def check(hidden, weight, labels, reduction="none", z_loss_coef=1e-4, chunk_size=None, ignore_index=-100):
    """Run the op, backprop random upstream gradients into ce and z, compare with the spec."""
    dtype = hidden.dtype
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    ce, z = olmo2_kernels.linear_cross_entropy(h, w, labels, ignore_index, z_loss_coef, reduction, chunk_size)
    assert ce.dtype == torch.float32 and z.dtype == torch.float32
    g_ce, g_z = torch.randn_like(ce), torch.randn_like(z)
    torch.autograd.backward((ce, z), (g_ce, g_z))

    h64, w64 = f64_leaf(h), f64_leaf(w)
    ce64, z64 = reference.linear_cross_entropy(h64, w64, labels, ignore_index, z_loss_coef, reduction)
    torch.autograd.backward((ce64, z64), (g_ce.double(), g_z.double()))
    n = hidden.shape[0]
    # bf16 logits (CPU) are rounded once before the row kernels: losses get the
    # tolerance of the inputs' dtype.
    assert_close(ce, ce64, dtype, reduction=n, name="ce")
    assert_close(z, z64, dtype, reduction=n, name="z")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(h.grad, h64.grad, dtype, name="dhidden")
    assert_close(w.grad, w64.grad, dtype, reduction=n, name="dweight")
    assert (h.grad[labels == ignore_index] == 0).all(), "ignored tokens must get zero dhidden"
    return ce, z, h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n, h, v, chunk",
    [
        (1, 16, 96, None),
        (7, 24, 200, 3),
        (37, 16, 1025, 8),  # chunks of 8, 8, 8, 8, 5
        (37, 16, 200, 16),
        (37, 16, 96, 64),  # chunk > N
        (300, 16, 200, None),
        (5, 8, 5003, 2),  # vocabulary wider than the row kernels' block
    ],
)
def test_forward_backward(backend, device, dtype, n, h, v, chunk):
    hidden, weight, labels = make_inputs(n, h, v, device, dtype)
    check(hidden, weight, labels, reduction="none", chunk_size=chunk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-4, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_z_loss(backend, device, dtype, reduction, z_loss_coef):
    hidden, weight, labels = make_inputs(37, 16, 200, device, dtype)
    check(hidden, weight, labels, reduction=reduction, z_loss_coef=z_loss_coef, chunk_size=16)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, device, reduction):
    hidden, weight, _ = make_inputs(9, 16, 200, device, torch.float32)
    labels = torch.full((9,), -100, device=device)
    ce, z, dhidden, dweight = check(hidden, weight, labels, reduction=reduction, z_loss_coef=0.1, chunk_size=4)
    assert (ce == 0).all() and (z == 0).all()
    assert (dhidden == 0).all() and (dweight == 0).all()


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_custom_ignore_index_and_label_dtypes(backend, device, label_dtype):
    hidden, weight, labels = make_inputs(23, 16, 96, device, torch.float32, ignore_every=3, ignore_index=5,
                                         label_dtype=label_dtype)
    check(hidden, weight, labels, reduction="mean", ignore_index=5, chunk_size=8)


def test_z_loss_off_is_plain_cross_entropy(backend, device):
    hidden, weight, labels = make_inputs(37, 16, 200, device, torch.float32)
    for reduction in REDUCTIONS:
        ce0, z0 = olmo2_kernels.linear_cross_entropy(hidden, weight, labels, z_loss_coef=0.0, reduction=reduction,
                                                     chunk_size=16)
        ce1, z1 = olmo2_kernels.linear_cross_entropy(hidden, weight, labels, z_loss_coef=1e-4, reduction=reduction,
                                                     chunk_size=16)
        assert torch.equal(ce0, ce1), "the z-loss must not leak into the cross-entropy"
        assert (z0 == 0).all() and (z1 != 0).any()
    check(hidden, weight, labels, reduction="mean", z_loss_coef=0.0, chunk_size=16)


def test_bf16_dweight_accumulates_in_fp32(backend, device):
    """64 chunks pushing the same weight rows the same way: summed in bf16, the
    per-chunk LM-head gradients lose a large part of each increment to rounding
    (2 to 4 times the tolerance here); summed in fp32 they do not."""
    n, h, v = 256, 16, 96
    hidden = (1 + 0.01 * torch.randn(n, h, device=device)).to(torch.bfloat16)
    weight = (0.1 * torch.randn(v, h, device=device)).to(torch.bfloat16)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    check(hidden, weight, labels, reduction="sum", z_loss_coef=1e-4, chunk_size=4)


def test_strided_hidden(backend, device):
    hidden = torch.randn(16, 29, device=device).t()  # (29, 16), column-major
    weight = torch.randn(200, 16, device=device) / 2
    labels = torch.randint(0, 200, (29,), device=device)
    check(hidden, weight, labels, reduction="mean", chunk_size=8)


def test_default_chunk_size():
    chunk = lce_module.default_chunk_size
    assert chunk(16384, 2048, 100352) == 512  # OLMo 2 1B: ceil(100352 / 2048) = 49 -> 335 -> 512
    assert chunk(16384, 4096, 100352) == 1024  # 7B: 25 -> 656 -> 1024
    assert chunk(10, 2048, 100352) == 10  # never more than N
    assert chunk(1000, 16, 3001) == 64  # at least MIN_CHUNK
    assert chunk(10**7, 4096, 4096) == 4096  # at most MAX_CHUNK
    assert chunk(0, 16, 96) == 1


def test_empty_batch(backend, device):
    hidden = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(96, 16, device=device, requires_grad=True)
    ce, z = olmo2_kernels.linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.int64, device=device))
    assert ce.item() == 0 and z.item() == 0
    (ce + z).backward()
    assert (weight.grad == 0).all() and hidden.grad.shape == (0, 16)


def test_labels_out_of_range_raise():
    hidden, weight = torch.randn(4, 8), torch.randn(96, 8)
    for bad in (96, -1):
        with pytest.raises(ValueError, match=r"linear_cross_entropy: labels must be in \[0, 96\)"):
            olmo2_kernels.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, bad, -100]))


def test_compile_fullgraph(backend, device):
    hidden, weight, labels = make_inputs(13, 16, 200, device, torch.float32, ignore_every=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def loss_fn(x, w, y):
        ce, z = olmo2_kernels.linear_cross_entropy(x, w, y, z_loss_coef=1e-2, chunk_size=4)
        return ce + z

    fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = fn(hidden, weight, labels)
    loss.backward()
    h64, w64 = f64_leaf(hidden), f64_leaf(weight)
    ce64, z64 = reference.linear_cross_entropy(h64, w64, labels, z_loss_coef=1e-2)
    (ce64 + z64).backward()
    assert_close(loss, ce64 + z64, torch.float32, name="loss")
    assert_close(hidden.grad, h64.grad, torch.float32, name="dhidden")
    assert_close(weight.grad, w64.grad, torch.float32, reduction=13, name="dweight")
    assert (hidden.grad[labels == -100] == 0).all()


# --------------------------------------------------------------------------- gradients in the forward
# With reduction "mean"/"sum" and a gradient needed, the forward computes the
# gradients of ce + z and the backward scales them (the fused path); the tests
# above backprop different upstream gradients into ce and z, which takes the
# recompute fallback. These take the fused path.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-4])
def test_fused_gradients(backend, device, dtype, reduction, z_loss_coef):
    hidden, weight, labels = make_inputs(37, 24, 301, device, dtype, ignore_every=3)
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    ce, z = olmo2_kernels.linear_cross_entropy(
        h, w, labels, z_loss_coef=z_loss_coef, reduction=reduction, chunk_size=16
    )
    scale = 0.7  # an upstream gradient away from 1: the saved gradients must be scaled
    (scale * (ce + z)).backward()
    h64, w64 = f64_leaf(hidden), f64_leaf(weight)
    ce64, z64 = reference.linear_cross_entropy(h64, w64, labels, z_loss_coef=z_loss_coef, reduction=reduction)
    (scale * (ce64 + z64)).backward()
    assert_close(ce, ce64, dtype, reduction=37, name="ce")
    assert_close(z, z64, dtype, reduction=37, name="z")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(h.grad, h64.grad, dtype, name="dhidden")
    assert_close(w.grad, w64.grad, dtype, reduction=37, name="dweight")
    assert (h.grad[labels == -100] == 0).all()


class _CountChunkMatmuls:
    """Counts the chunk logits matmuls, forward and backward apart."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = lce_module._chunk_logits

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(lce_module, "_chunk_logits", counting)


@pytest.mark.parametrize("same_upstream", [True, False])
def test_fused_path_never_recomputes_the_logits(backend, device, monkeypatch, same_upstream):
    if backend == "torch":
        pytest.skip("the torch backend is the spec: no chunks")
    counter = _CountChunkMatmuls(monkeypatch)
    hidden, weight, labels = make_inputs(50, 16, 96, device, torch.float32)
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    ce, z = olmo2_kernels.linear_cross_entropy(h, w, labels, z_loss_coef=1e-3, chunk_size=16)
    assert counter.calls == 4  # ceil(50 / 16) chunks
    if same_upstream:
        compared = []
        equal = torch.equal
        monkeypatch.setattr(torch, "equal", lambda *args: compared.append(1) or equal(*args))
        (ce + z).backward()
        assert counter.calls == 4, "the backward must reuse the gradients of the forward"
        assert not compared, "loss = ce + z needs no comparison of the upstream gradients (a device sync)"
    else:
        # Different upstream gradients for ce and z: recomputed, still exact.
        torch.autograd.backward((ce, z), (torch.tensor(0.5), torch.tensor(2.0)))
        assert counter.calls == 8
    h64, w64 = f64_leaf(hidden), f64_leaf(weight)
    ce64, z64 = reference.linear_cross_entropy(h64, w64, labels, z_loss_coef=1e-3)
    if same_upstream:
        (ce64 + z64).backward()
    else:
        (0.5 * ce64 + 2.0 * z64).backward()
    assert_close(h.grad, h64.grad, torch.float32, name="dhidden")
    assert_close(w.grad, w64.grad, torch.float32, reduction=50, name="dweight")


def test_no_grad_forward_computes_no_gradients(backend, device, monkeypatch):
    hidden, weight, labels = make_inputs(21, 16, 96, device, torch.float32)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with_grad = olmo2_kernels.linear_cross_entropy(h, w, labels, z_loss_coef=1e-3)
    if backend != "torch":
        calls = []
        monkeypatch.setattr(lce_module, "_chunk_grads", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        without = olmo2_kernels.linear_cross_entropy(h, w, labels, z_loss_coef=1e-3)
    if backend != "torch":
        assert not calls
    for a, b in zip(with_grad, without):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_gradient_for_one_input_only(backend, device, which):
    hidden, weight, labels = make_inputs(19, 16, 96, device, torch.bfloat16)
    h = hidden.detach().requires_grad_(which == "hidden")
    w = weight.detach().requires_grad_(which == "weight")
    ce, z = olmo2_kernels.linear_cross_entropy(h, w, labels, z_loss_coef=1e-4, chunk_size=5)
    (ce + z).backward()
    h64, w64 = f64_leaf(hidden), f64_leaf(weight)
    ce64, z64 = reference.linear_cross_entropy(h64, w64, labels, z_loss_coef=1e-4)
    (ce64 + z64).backward()
    if which == "hidden":
        assert w.grad is None
        assert_close(h.grad, h64.grad, torch.bfloat16, name="dhidden")
    else:
        assert h.grad is None
        assert_close(w.grad, w64.grad, torch.bfloat16, reduction=19, name="dweight")


def test_backward_twice_with_retain_graph(backend, device):
    """The saved gradients are not consumed by the first backward."""
    hidden, weight, labels = make_inputs(23, 16, 96, device, torch.float32)
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    ce, z = olmo2_kernels.linear_cross_entropy(h, w, labels, z_loss_coef=1e-4, chunk_size=7)
    loss = ce + z
    loss.backward(retain_graph=True)
    first_h, first_w = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first_h)
    torch.testing.assert_close(w.grad, 2 * first_w)


# --------------------------------------------------------------------------- the vocabulary split
# A chunk has few rows (256 at OLMo 2 1B and 8192 tokens), so the row kernels
# split each row's vocabulary across programs to fill the GPU. The same
# happens here at small sizes: 132 SMs (the default off CUDA) split rows of
# 3 blocks into 3 slices (slices of several blocks: tests/test_cross_entropy.py).
@pytest.mark.skipif(skip_reason("triton", OP) is not None, reason="backend 'triton' unavailable")
@pytest.mark.parametrize("path, dtype", [("fused", torch.float32), ("recompute", torch.bfloat16)])
def test_vocabulary_split(monkeypatch, path, dtype):
    n, chunk, v = 5, 4, 9001  # chunks of 4 and 1 rows, 3 blocks each
    slices = (3, 3)
    device = device_for("triton")
    rec = RecordLaunches(monkeypatch, ce_module)
    hidden, weight, labels = make_inputs(n, 8, v, device, dtype, ignore_every=3)
    labels[0] = v - 1  # a target in the last slice
    with olmo2_kernels.use_backend("triton"), _triton.assume_sm_count(132):
        if path == "recompute":
            check(hidden, weight, labels, reduction="none", z_loss_coef=1e-3, chunk_size=chunk)
        else:
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            ce, z = olmo2_kernels.linear_cross_entropy(h, w, labels, z_loss_coef=1e-3, chunk_size=chunk)
            (ce + z).backward()
            h64, w64 = f64_leaf(hidden), f64_leaf(weight)
            ce64, z64 = reference.linear_cross_entropy(h64, w64, labels, z_loss_coef=1e-3)
            (ce64 + z64).backward()
            assert_close(ce, ce64, dtype, reduction=n, name="ce")
            assert_close(z, z64, dtype, reduction=n, name="z")
            assert_close(h.grad, h64.grad, dtype, name="dhidden")
            assert_close(w.grad, w64.grad, dtype, reduction=n, name="dweight")
    fwd = rec.of("_cross_entropy_fwd_kernel")
    chunks = [min(chunk, n - start) for start in range(0, n, chunk)]
    assert [launch.grid for launch in fwd] == [(rows, s) for rows, s in zip(chunks, slices)]
    assert len(rec.of("_cross_entropy_fwd_combine_kernel")) == len(chunks)
    # the backward: once per chunk on the fused path, in the backward on the recompute path
    assert [launch.grid for launch in rec.of("_cross_entropy_bwd_kernel")] == [launch.grid for launch in fwd]


# --------------------------------------------------------------------------- memory
# N * V dominates everything else: a row of fp32 logits is 4 kB, the per-token
# values and gradients about 100 B. Sizes kept small for the Triton
# interpreter, which runs the GPU's tiles (4 rows of 1024 columns) one program
# at a time.
MEM_H, MEM_V = 8, 1001


def peak_extra_bytes(device, n, chunk_size):
    """Peak bytes allocated by a forward + backward (including the gradients
    themselves) over what existed before."""
    torch.manual_seed(0)
    hidden = torch.randn(n, MEM_H, device=device, requires_grad=True)
    weight = torch.randn(MEM_V, MEM_H, device=device, requires_grad=True)
    labels = torch.randint(0, MEM_V, (n,), device=device)
    labels[::5] = -100
    gc.collect()

    def step():
        ce, z = olmo2_kernels.linear_cross_entropy(hidden, weight, labels, z_loss_coef=1e-4, chunk_size=chunk_size)
        (ce + z).backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakAllocations() as mem:
        step()
    return mem.peak


def test_memory_grows_with_chunk_not_tokens(backend, device):
    if backend == "torch":
        pytest.skip("the torch backend is the spec: it materializes the logits (see test_memory_of_the_spec)")
    chunk_logits = MEM_V * 4  # bytes of one row of fp32 logits
    if device.type == "cuda":
        peak_extra_bytes(device, 64, 64)  # one-time allocations (the cuBLAS workspace) are not the op's
    growth_n = peak_extra_bytes(device, 256, 32) - peak_extra_bytes(device, 32, 32)
    # Full logits would add (256 - 32) rows; what does grow with N is the
    # per-token vectors and dhidden (about 100 bytes per token here).
    assert growth_n < 0.1 * (256 - 32) * chunk_logits, growth_n

    growth_chunk = peak_extra_bytes(device, 128, 128) - peak_extra_bytes(device, 128, 16)
    # One (chunk, V) logits buffer, reused across chunks. Under the Triton
    # interpreter a launched kernel's arguments stay alive until the next
    # garbage collection, so a finished buffer may still overlap the next one.
    expected = (128 - 16) * chunk_logits
    assert 0.5 * expected < growth_chunk < 3 * expected, (growth_chunk, expected)


def test_memory_of_the_spec():
    """The measurement can fail: the spec, which materializes the logits, grows with N."""
    with olmo2_kernels.use_backend("torch"):
        growth_n = peak_extra_bytes(torch.device("cpu"), 256, 32) - peak_extra_bytes(torch.device("cpu"), 32, 32)
    assert growth_n > (256 - 32) * MEM_V * 4, growth_n


class TestBadInput:
    def args(self, **overrides):
        a = dict(hidden=torch.randn(4, 8), weight=torch.randn(96, 8), labels=torch.zeros(4, dtype=torch.int64))
        a.update(overrides)
        return a

    def call(self, **overrides):
        a = self.args(**{k: v for k, v in overrides.items() if k in ("hidden", "weight", "labels")})
        kw = {k: v for k, v in overrides.items() if k not in a}
        return olmo2_kernels.linear_cross_entropy(a["hidden"], a["weight"], a["labels"], **kw)

    def test_integer_hidden(self):
        with pytest.raises(TypeError, match="linear_cross_entropy: hidden must have dtype"):
            self.call(hidden=torch.ones(4, 8, dtype=torch.int64))

    def test_float_labels(self):
        with pytest.raises(TypeError, match="linear_cross_entropy: labels must have dtype"):
            self.call(labels=torch.zeros(4))

    def test_hidden_3d(self):
        with pytest.raises(ValueError, match=r"linear_cross_entropy: hidden must be 2-D \(N, H\)"):
            self.call(hidden=torch.randn(2, 2, 8))

    def test_hidden_1d(self):
        with pytest.raises(ValueError, match="linear_cross_entropy: hidden must have at least 2 dim"):
            self.call(hidden=torch.randn(8))

    def test_weight_hidden_size(self):
        with pytest.raises(ValueError, match=r"linear_cross_entropy: weight must be 2-D \(V, H\) with H = "):
            self.call(weight=torch.randn(96, 9))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="linear_cross_entropy: weight must have the dtype of hidden"):
            self.call(weight=torch.randn(96, 8, dtype=torch.bfloat16))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="linear_cross_entropy: weight is on meta but hidden is on cpu"):
            self.call(weight=torch.randn(96, 8, device="meta"))

    def test_labels_device(self):
        with pytest.raises(ValueError, match="linear_cross_entropy: labels is on meta"):
            self.call(labels=torch.zeros(4, dtype=torch.int64, device="meta"))

    def test_label_length(self):
        with pytest.raises(ValueError, match=r"linear_cross_entropy: labels must have shape \(4,\)"):
            self.call(labels=torch.zeros(5, dtype=torch.int64))

    def test_reduction(self):
        with pytest.raises(ValueError, match="linear_cross_entropy: reduction must be one of"):
            self.call(reduction="batchmean")

    def test_negative_z_loss_coef(self):
        with pytest.raises(ValueError, match="linear_cross_entropy: z_loss_coef must be a non-negative number"):
            self.call(z_loss_coef=-0.1)

    @pytest.mark.parametrize("chunk_size", [0, -8, 2.5, True, "64"])
    def test_chunk_size(self, chunk_size):
        with pytest.raises(ValueError, match="linear_cross_entropy: chunk_size must be a positive int or None"):
            self.call(chunk_size=chunk_size)
