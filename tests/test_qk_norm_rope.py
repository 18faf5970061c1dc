"""qk_norm_rope: forward and every gradient against the float64 spec on every
backend, parity with Hugging Face's OLMo 2 attention, and input checks."""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import olmo2_kernels
from olmo2_kernels import reference, rope_cos_sin
from conftest import device_for, skip_reason
from tolerances import assert_close, f64_leaf

OP = "qk_norm_rope"
DTYPES = (torch.float32, torch.bfloat16)


def make(batch, seq_len, head_dim, n_q_heads, n_kv_heads, device, dtype, theta=10_000.0):
    """Random q/k (..., T, H*D), weights and cos/sin tables for T positions."""
    q = (torch.randn(*batch, seq_len, n_q_heads * head_dim, device=device) * 3 + 0.5).to(dtype)
    k = (torch.randn(*batch, seq_len, n_kv_heads * head_dim, device=device) * 2 - 0.3).to(dtype)
    q_weight = torch.randn(n_q_heads * head_dim, device=device).to(dtype)
    k_weight = torch.randn(n_kv_heads * head_dim, device=device).to(dtype)
    # a small theta so that every frequency turns visibly within a few positions
    cos, sin = rope_cos_sin(seq_len, head_dim, theta=theta, device=device)
    return q, k, q_weight, k_weight, cos, sin


def check(q, k, q_weight, k_weight, cos, sin, head_dim, eps=1e-6, weight_dtype=None):
    """Run the op, backprop random upstream gradients into both outputs, compare with the spec."""
    dtype = q.dtype
    q, k, q_weight, k_weight = (t.detach().requires_grad_(True) for t in (q, k, q_weight, k_weight))
    q_out, k_out = olmo2_kernels.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, head_dim, eps)
    assert q_out.dtype == dtype and q_out.shape == q.shape
    assert k_out.dtype == dtype and k_out.shape == k.shape
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))

    leaves = [f64_leaf(t) for t in (q, k, q_weight, k_weight)]
    q64, k64 = reference.qk_norm_rope(*leaves, cos.double(), sin.double(), head_dim, eps)
    torch.autograd.backward((q64, k64), (dq_out.double(), dk_out.double()))
    rows = q.numel() // q.shape[-1]
    assert_close(q_out, q64, dtype, name="q_out")
    assert_close(k_out, k64, dtype, name="k_out")
    assert_close(q.grad, leaves[0].grad, dtype, name="dq")
    assert_close(k.grad, leaves[1].grad, dtype, name="dk")
    for name, w, w64 in (("dq_weight", q_weight, leaves[2]), ("dk_weight", k_weight, leaves[3])):
        assert w.grad.dtype == w.dtype
        assert_close(w.grad, w64.grad, weight_dtype or dtype, reduction=rows, name=name)


# (leading dims, T, head_dim, Hq, Hk): every T, head_dim (incl. non powers of two)
# and Hq appears, GQA down to a single kv head, with and without batch dims.
CASES = [
    ((), 7, 8, 3, 1),
    ((), 33, 64, 1, 1),
    ((1,), 1, 64, 1, 1),
    ((1,), 33, 96, 5, 1),
    ((1,), 7, 24, 5, 5),
    ((2,), 7, 24, 3, 3),
    ((2,), 7, 64, 3, 1),
    ((2,), 1, 8, 5, 1),
    ((2, 2), 3, 24, 3, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq_len,head_dim,n_q_heads,n_kv_heads", CASES)
def test_forward_backward(backend, device, dtype, batch, seq_len, head_dim, n_q_heads, n_kv_heads):
    check(*make(batch, seq_len, head_dim, n_q_heads, n_kv_heads, device, dtype), head_dim)


def test_single_kv_head_is_normalized_and_rotated(backend, device):
    """With one kv head, k must still be normalized and rotated (not passed through)."""
    q, k, qw, kw, cos, sin = make((2,), 7, 8, 4, 1, device, torch.float32)
    _, k_out = olmo2_kernels.qk_norm_rope(q, k, qw, kw, cos, sin, 8)
    normed_only = reference.rms_norm(k.double(), kw.double())
    assert not torch.allclose(k_out[:, 1:].double(), normed_only[:, 1:], atol=1e-3)
    assert_close(k_out, reference.qk_norm_rope(q.double(), k.double(), qw.double(), kw.double(),
                                               cos.double(), sin.double(), 8)[1], torch.float32, name="k_out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_arbitrary_tables(backend, device, dtype):
    """The spec takes cos/sin (T, head_dim) as given: halves that differ must be read where they belong."""
    q, k, qw, kw, _, _ = make((2,), 5, 24, 3, 1, device, dtype)
    check(q, k, qw, kw, torch.randn(5, 24, device=device), torch.randn(5, 24, device=device), 24)


def test_fp32_weights_and_tables_bf16_input(backend, device):
    q, k, qw, kw, cos, sin = make((1,), 5, 24, 3, 1, device, torch.bfloat16)
    check(q, k, qw.float(), kw.float(), cos, sin, 24, weight_dtype=torch.bfloat16)
    check(q, k, qw, kw, cos.bfloat16(), sin.bfloat16(), 24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(backend, device, dtype):
    batch, seq_len, head_dim, n_q_heads, n_kv_heads = 2, 5, 24, 3, 1
    q_width, kv_width = n_q_heads * head_dim, n_kv_heads * head_dim
    _, _, qw, kw, cos, sin = make((batch,), seq_len, head_dim, n_q_heads, n_kv_heads, device, dtype)
    # q and k as slices of a fused qkv projection output: strided rows, read in place
    qkv = torch.randn(batch, seq_len, q_width + 2 * kv_width, device=device, dtype=dtype)
    check(qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qw, kw, cos, sin, head_dim)
    # (T, B, W) transposed to (B, T, W): rows are not in (B, T) order in memory
    q_t = torch.randn(seq_len, batch, q_width, device=device, dtype=dtype).transpose(0, 1)
    k_t = torch.randn(seq_len, batch, kv_width, device=device, dtype=dtype).transpose(0, 1)
    check(q_t, k_t, qw, kw, cos, sin, head_dim)
    # strided weights and a cos/sin sliced from a longer table
    cos_long, sin_long = rope_cos_sin(2 * seq_len + 1, head_dim, theta=10_000.0, device=device)
    check(qkv[..., :q_width], qkv[..., -kv_width:], torch.randn(2 * q_width, device=device, dtype=dtype)[::2],
          kw, cos_long[1::2], sin_long[1::2], head_dim)


def test_positions_offset(backend, device):
    """cos/sin of positions past..past+T (generation with a cache)."""
    q, k, qw, kw, _, _ = make((1,), 7, 64, 3, 1, device, torch.float32)
    cos, sin = rope_cos_sin(torch.arange(100, 107, device=device), 64)
    check(q, k, qw, kw, cos, sin, 64)


def test_large_eps_zero_rows_and_empty(backend, device):
    q, k, qw, kw, cos, sin = make((2,), 7, 8, 3, 1, device, torch.float32)
    check(torch.zeros_like(q), k, qw, kw, cos, sin, 8, eps=1e-2)
    q0, k0, qw, kw, cos0, sin0 = make((0,), 7, 8, 3, 1, device, torch.float32)
    q_out, k_out = olmo2_kernels.qk_norm_rope(q0, k0, qw, kw, cos0, sin0, 8)
    assert q_out.shape == q0.shape and k_out.shape == k0.shape


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seq_len=st.integers(1, 9),
    half=st.integers(1, 20),
    n_q_heads=st.integers(1, 4),
    single_kv=st.booleans(),
    bf16=st.booleans(),
    scale=st.floats(1e-3, 1e3),
)
def test_fuzz_shapes(backend, device, seq_len, half, n_q_heads, single_kv, bf16, scale):
    dtype = torch.bfloat16 if bf16 else torch.float32
    q, k, qw, kw, cos, sin = make((1,), seq_len, 2 * half, n_q_heads, 1 if single_kv else n_q_heads, device, dtype)
    check((q.float() * scale).to(dtype), k, qw, kw, cos, sin, 2 * half)


def test_compile_fullgraph(backend, device):
    q, k, qw, kw, cos, sin = make((2,), 7, 24, 3, 1, device, torch.float32)
    q, k, qw, kw = (t.requires_grad_(True) for t in (q, k, qw, kw))
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)

    def loss(q, k, qw, kw):
        q_out, k_out = olmo2_kernels.qk_norm_rope(q, k, qw, kw, cos, sin, 24)
        return (q_out * dq_out).sum() + (k_out * dk_out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(q, k, qw, kw).backward()
    leaves = [f64_leaf(t) for t in (q, k, qw, kw)]
    q64, k64 = reference.qk_norm_rope(*leaves, cos.double(), sin.double(), 24)
    ((q64 * dq_out.double()).sum() + (k64 * dk_out.double()).sum()).backward()
    for name, t, t64, rows in zip(("dq", "dk", "dq_weight", "dk_weight"), (q, k, qw, kw), leaves, (1, 1, 14, 14)):
        assert_close(t.grad, t64.grad, torch.float32, reduction=rows, name=name)


def test_only_q_used(backend, device):
    """An unused k output still gives finite (zero) gradients for k and k_weight."""
    q, k, qw, kw, cos, sin = make((1,), 7, 8, 3, 1, device, torch.float32)
    q, k, qw, kw = (t.requires_grad_(True) for t in (q, k, qw, kw))
    q_out, _ = olmo2_kernels.qk_norm_rope(q, k, qw, kw, cos, sin, 8)
    q_out.sum().backward()
    assert k.grad is None or torch.count_nonzero(k.grad) == 0
    assert kw.grad is None or torch.count_nonzero(kw.grad) == 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(qw.grad).all()


# --------------------------------------------------------------------------- parity with transformers
def _olmo2_config(head_dim, n_q_heads, n_kv_heads, eps=1e-6):
    transformers = pytest.importorskip("transformers")
    return transformers.Olmo2Config(
        hidden_size=head_dim * n_q_heads,
        num_attention_heads=n_q_heads,
        num_key_value_heads=n_kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        max_position_embeddings=64,
        rms_norm_eps=eps,
    )


@pytest.mark.parametrize("head_dim", [8, 24, 64])
def test_rope_cos_sin_matches_transformers(head_dim):
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RotaryEmbedding

    rotary = Olmo2RotaryEmbedding(_olmo2_config(head_dim, 3, 1))
    positions = torch.tensor([[0, 1, 2, 7, 33, 1000, 4095]])
    cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin(positions[0], head_dim)
    assert cos.dtype == torch.float32 and cos.shape == (7, head_dim)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    cos_len, _ = rope_cos_sin(7, head_dim)
    assert torch.equal(cos_len, rope_cos_sin(torch.arange(7), head_dim)[0])


@pytest.mark.parametrize("head_dim,n_q_heads,n_kv_heads", [(8, 3, 1), (24, 5, 5), (64, 2, 1)])
def test_matches_transformers_attention_prologue(backend, device, head_dim, n_q_heads, n_kv_heads):
    """q_norm/k_norm (Olmo2RMSNorm over the whole projection) then apply_rotary_pos_emb, in fp32."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm, Olmo2RotaryEmbedding, apply_rotary_pos_emb

    batch, seq_len = 2, 7
    config = _olmo2_config(head_dim, n_q_heads, n_kv_heads)
    q_norm = Olmo2RMSNorm(n_q_heads * head_dim, config.rms_norm_eps).to(device)
    k_norm = Olmo2RMSNorm(n_kv_heads * head_dim, config.rms_norm_eps).to(device)
    with torch.no_grad():
        q_norm.weight.normal_()
        k_norm.weight.normal_()
    q = torch.randn(batch, seq_len, n_q_heads * head_dim, device=device)
    k = torch.randn(batch, seq_len, n_kv_heads * head_dim, device=device)
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    cos_hf, sin_hf = Olmo2RotaryEmbedding(config).to(device)(q, positions)

    def heads(x):  # (B, T, H*D) -> (B, H, T, D), as Olmo2Attention lays them out
        return x.view(batch, seq_len, -1, head_dim).transpose(1, 2)

    q_hf, k_hf = apply_rotary_pos_emb(heads(q_norm(q)), heads(k_norm(k)), cos_hf, sin_hf)
    cos, sin = rope_cos_sin(seq_len, head_dim, device=device)
    q_out, k_out = olmo2_kernels.qk_norm_rope(
        q, k, q_norm.weight, k_norm.weight, cos, sin, head_dim, config.rms_norm_eps
    )
    assert_close(heads(q_out), q_hf.double(), torch.float32, name="q vs transformers")
    assert_close(heads(k_out), k_hf.double(), torch.float32, name="k vs transformers")


# --------------------------------------------------------------------------- input checks
def _args(**override):
    args = dict(
        q=torch.randn(2, 5, 16), k=torch.randn(2, 5, 8), q_weight=torch.ones(16), k_weight=torch.ones(8),
        cos=torch.ones(5, 8), sin=torch.zeros(5, 8), head_dim=8,
    )
    args.update(override)
    return args


class TestBadInput:
    @pytest.mark.parametrize("override,error,message", [
        (dict(q=[1.0]), TypeError, "qk_norm_rope: q must be a torch.Tensor"),
        (dict(q=torch.ones(2, 5, 16, dtype=torch.int32)), TypeError, "qk_norm_rope: q must have dtype"),
        (dict(k=torch.randn(2, 5, 8, dtype=torch.float64)), TypeError, "qk_norm_rope: k must have the dtype of q"),
        (dict(q_weight=torch.ones(16, dtype=torch.int64)), TypeError, "qk_norm_rope: q_weight must have dtype"),
        (dict(cos=torch.ones(5, 8, dtype=torch.int64)), TypeError, "qk_norm_rope: cos must have dtype"),
        (dict(q=torch.randn(16)), ValueError, "qk_norm_rope: q must have at least 2 dim"),
        (dict(k=torch.randn(2, 4, 8)), ValueError, "qk_norm_rope: q and k must agree on all dims but the last"),
        (dict(head_dim=6), ValueError,
         r"qk_norm_rope: the last dim of q \(16\) must be a positive multiple of head_dim \(6\)"),
        (dict(k=torch.randn(2, 5, 12), k_weight=torch.ones(12)), ValueError,
         r"qk_norm_rope: the last dim of k \(12\) must be a positive multiple of head_dim \(8\)"),
        (dict(k=torch.randn(2, 5, 0), k_weight=torch.ones(0)), ValueError, "the last dim of k .0. must be a positive"),
        (dict(head_dim=7), ValueError, "qk_norm_rope: head_dim must be a positive even int, got 7"),
        (dict(head_dim=8.0), ValueError, "qk_norm_rope: head_dim must be a positive even int"),
        (dict(q_weight=torch.ones(8)), ValueError, r"qk_norm_rope: q_weight must have shape \(16,\)"),
        (dict(k_weight=torch.ones(16)), ValueError, r"qk_norm_rope: k_weight must have shape \(8,\)"),
        (dict(cos=torch.ones(6, 8)), ValueError, r"qk_norm_rope: cos must have shape \(5, 8\)"),
        (dict(sin=torch.ones(5, 16)), ValueError, r"qk_norm_rope: sin must have shape \(5, 8\)"),
        (dict(cos=torch.ones(5, 8, device="meta")), ValueError, "qk_norm_rope: cos is on meta but q is on cpu"),
        (dict(k_weight=torch.ones(8, device="meta")), ValueError, "qk_norm_rope: k_weight is on meta but q is on cpu"),
        (dict(eps=0.0), ValueError, "qk_norm_rope: eps must be a positive number"),
    ])
    def test_rejected(self, override, error, message):
        with pytest.raises(error, match=message):
            olmo2_kernels.qk_norm_rope(**_args(**override))

    def test_rope_cos_sin_odd_head_dim(self):
        with pytest.raises(ValueError, match="rope_cos_sin: head_dim must be a positive even int"):
            rope_cos_sin(4, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a tensor past 2^31 elements")
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_int64_offsets(gpu_backend):
    reason = __import__("conftest").skip_reason(gpu_backend, OP)
    if reason:
        pytest.skip(reason)
    head_dim, n_q_heads, seq_len = 128, 32, 4096
    batch = 2**31 // (seq_len * n_q_heads * head_dim) + 1  # q has more than 2^31 elements
    q = torch.randn(batch, seq_len, n_q_heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    qw = torch.randn(n_q_heads * head_dim, device="cuda", dtype=torch.bfloat16)
    kw = torch.randn(head_dim, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(seq_len, head_dim, device="cuda")
    with olmo2_kernels.use_backend(gpu_backend):
        q_out, _ = olmo2_kernels.qk_norm_rope(q, k, qw, kw, cos, sin, head_dim)
        dq_out = torch.randn_like(q_out)
        q_out.backward(dq_out)
    tail = (slice(batch - 1, batch), slice(seq_len - 3, seq_len))
    q64 = q[tail].detach().double().requires_grad_(True)
    ref, _ = reference.qk_norm_rope(q64, k[tail].double(), qw.double(), kw.double(),
                                    cos[-3:].double(), sin[-3:].double(), head_dim)
    ref.backward(dq_out[tail].double())
    assert_close(q_out[tail], ref, torch.bfloat16, name="tail rows")
    assert_close(q.grad[tail], q64.grad, torch.bfloat16, name="tail rows dq")


# --------------------------------------------------------------------------- the GPU's tilings
qk_module = importlib.import_module("olmo2_kernels.qk_norm_rope")


@pytest.mark.parametrize(
    "n_q_heads, n_kv_heads, q_tiles",
    [
        (16, 16, (16, 0, 8, 16)),  # 1B: (BLOCK_H, BLOCK_H2, forward warps, backward warps)
        (32, 32, (32, 0, 16, 32)),  # 7B
        (40, 40, (32, 8, 32, 32)),  # 13B: 32 + 8 heads, no padding
        (40, 8, (32, 8, 32, 32)),  # 32B (8 kv heads)
    ],
)
def test_gpu_tiling(n_q_heads, n_kv_heads, q_tiles, monkeypatch):
    """The launchers' production tilings at OLMo 2 head counts (head_dim 128), run
    under the interpreter on two tokens against the spec."""
    from launches import RecordLaunches

    if skip_reason("triton", OP):
        pytest.skip(skip_reason("triton", OP))
    device = device_for("triton")
    recorder = RecordLaunches(monkeypatch, qk_module)
    with olmo2_kernels.use_backend("triton"):
        check(*make((1,), 2, 128, n_q_heads, n_kv_heads, device, torch.bfloat16, theta=500_000.0), 128)
    calls = [{"kernel": launch.kernel, "grid": launch.grid, **launch.meta} for launch in recorder.launches]
    fwd_q, fwd_k, bwd_q, bwd_k = calls
    block_h, block_h2, fwd_warps, bwd_warps = q_tiles
    for call, warps in ((fwd_q, fwd_warps), (bwd_q, bwd_warps)):
        assert (call["BLOCK_H"], call["BLOCK_H2"], call["BLOCK_HALF"], call["num_warps"]) == (block_h, block_h2, 64, warps)
    assert fwd_k["BLOCK_H"] + fwd_k["BLOCK_H2"] == n_kv_heads and bwd_k["BLOCK_H2"] == fwd_k["BLOCK_H2"]


def test_rows_past_the_register_limit_are_refused():
    """Rows whose tile would spill get an error naming the limit, in the direction that needs it."""
    if skip_reason("triton", OP):
        pytest.skip(skip_reason("triton", OP))
    device = device_for("triton")
    with olmo2_kernels.use_backend("triton"):
        # 160 heads of 128: a 20480-element tile, past the forward's 16384
        q, k, qw, kw, cos, sin = make((), 1, 128, 160, 1, device, torch.float32)
        with pytest.raises(ValueError, match=r"qk_norm_rope: a row of 160 heads of head_dim 128 takes a 20480-element tile.*16384"):
            olmo2_kernels.qk_norm_rope(q, k, qw, kw, cos, sin, 128)
        # 96 heads: the forward holds them (12288), the backward (8192) does not
        q, k, qw, kw, cos, sin = make((), 1, 128, 96, 1, device, torch.float32)
        q.requires_grad_(True)
        q_out, k_out = olmo2_kernels.qk_norm_rope(q, k, qw, kw, cos, sin, 128)
        with pytest.raises(ValueError, match=r"takes a 12288-element tile.*at most 8192"):
            q_out.sum().backward()


def test_many_rows_per_program():
    """Fewer SMs than rows: each backward program loops over several rows."""
    from olmo2_kernels._triton import assume_sm_count

    if skip_reason("triton", OP):
        pytest.skip(skip_reason("triton", OP))
    device = device_for("triton")
    with olmo2_kernels.use_backend("triton"), assume_sm_count(1):
        check(*make((2,), 5, 24, 5, 3, device, torch.float32), 24)
