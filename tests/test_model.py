"""Olmo2ForCausalLM on its own: config and presets, counts, init, loss
semantics, padding and positions, the KV cache, attention and kernel backends,
bad input.

Comparisons with ``transformers`` live in test_hf_parity.py.

Model-level tolerances (fp32): one op on another backend agrees with the spec
within the fp32 row of tests/tolerances.py (2e-5); a forward through a 2-layer
model chains about a dozen such ops, whose errors add, so logits and the loss
are compared at a relative error (max |diff| / max |reference|) of 1e-4, and
parameter gradients (each a reduction over every token) at 1e-3.
"""
import math

import pytest
import torch

import olmo2_kernels
from olmo2 import Olmo2Config, Olmo2ForCausalLM, flops_per_token, num_parameters
from olmo2.config import PRESETS
from olmo2_kernels import _backend

MODEL_OPS = ("rms_norm", "qk_norm_rope", "swiglu", "linear_cross_entropy")
LOGITS_RTOL = 1e-4
GRAD_RTOL = 1e-3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def tiny_config(**overrides) -> Olmo2Config:
    """Odd sizes: hidden 40, 3 heads of 10 (q width 30 != hidden), 1 kv head, vocab 97."""
    base = dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=1, head_dim=10, max_position_embeddings=64, eos_token_id=None,
                pad_token_id=None)
    base.update(overrides)
    return Olmo2Config(**base)


def make_model(config=None, seed=0, **overrides) -> Olmo2ForCausalLM:
    model = Olmo2ForCausalLM.from_config(config or tiny_config(**overrides), generator=torch.Generator().manual_seed(seed))
    # Norm weights away from 1 so that a norm applied to the wrong tensor shows.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def backend_skip_reason(backend: str) -> str | None:
    for op in MODEL_OPS:
        reason = _backend.unavailable_reason(backend, "cpu", op)
        if reason:
            return f"backend {backend!r} cannot run {op} on CPU: {reason}"
    return None


# --------------------------------------------------------------------------- config
class TestConfig:
    def test_presets_published_shapes(self):
        c = Olmo2Config.preset("olmo2-7b")
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (4096, 32, 32, 11008)
        c32 = Olmo2Config.preset("olmo2-32b")
        assert (c32.num_attention_heads, c32.num_key_value_heads, c32.num_hidden_layers) == (40, 8, 64)
        for name in ("olmo2-1b", "olmo2-7b", "olmo2-13b", "olmo2-32b"):
            c = Olmo2Config.preset(name)
            assert (c.vocab_size, c.head_dim, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (
                100352, 128, 500000.0, 1e-6, 4096)
            assert (c.eos_token_id, c.pad_token_id) == (100257, 100277)

    def test_small_presets(self):
        tiny, test = Olmo2Config.preset("olmo2-tiny"), Olmo2Config.preset("olmo2-test")
        assert 1e6 < num_parameters(tiny) < 1e7 and 256 <= tiny.max_position_embeddings <= 512
        assert tiny.vocab_size == 512 and test.vocab_size >= 258  # byte-level tokenizer: 256 bytes + eos + pad
        assert num_parameters(test) < 5e5

    def test_preset_overrides_and_unknown(self):
        assert Olmo2Config.preset("olmo2-1b", num_hidden_layers=2).num_hidden_layers == 2
        with pytest.raises(ValueError, match="preset: name must be one of"):
            Olmo2Config.preset("olmo2-70b")
        with pytest.raises(ValueError, match=r"unknown field\(s\) \['hidden'\]"):
            Olmo2Config.preset("olmo2-1b", hidden=3)

    def test_dict_round_trip(self):
        c = tiny_config()
        assert Olmo2Config.from_dict(c.to_dict()) == c

    @pytest.mark.parametrize(
        "overrides, match",
        [
            (dict(hidden_size=0), "hidden_size must be a positive int"),
            (dict(num_attention_heads=3, num_key_value_heads=2), "multiple of num_key_value_heads"),
            (dict(head_dim=9), "head_dim must be a positive even int"),
            (dict(hidden_size=41, head_dim=None), "set head_dim explicitly"),
            (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
            (dict(eos_token_id=97), r"eos_token_id must be None or an int in \[0, vocab_size=97\)"),
            (dict(attn_backend="flex"), "attn_backend must be one of"),
            (dict(tie_word_embeddings=True), "untied"),
            (dict(num_hidden_layers=2.0), "num_hidden_layers must be a positive int"),
        ],
    )
    def test_validation(self, overrides, match):
        with pytest.raises(ValueError, match=match):
            tiny_config(**overrides)


# --------------------------------------------------------------------------- counts
class TestCounts:
    @pytest.mark.parametrize("name", sorted(PRESETS))
    def test_num_parameters_matches_module(self, name):
        config = Olmo2Config.preset(name)
        model = Olmo2ForCausalLM.from_config(config, device="meta")
        assert num_parameters(config) == model.num_parameters()
        embedding = config.vocab_size * config.hidden_size
        assert num_parameters(config, include_embedding=False) == model.num_parameters() - embedding

    def test_flops_per_token(self):
        """Causal attention as OLMo-core 3.0 counts it: 12 * H * D * (T (T + 1) / 2) / T per layer."""
        c = Olmo2Config.preset("olmo2-7b")
        n = num_parameters(c, include_embedding=False)
        causal = 32 * (12 * 32 * 128 * (4096 * 4097 // 2) // 4096)
        assert flops_per_token(c, 4096) == 6 * n + causal
        full = 6 * n + 12 * 32 * 32 * 128 * 4096  # the PaLM / pre-3.0 count
        assert full / flops_per_token(c, 4096) == pytest.approx(1.07, abs=0.01)  # MFU read ~7% high before
        # Hand count for the tiny config: per layer q/o 40x30 each, k/v 40x10 each, norms 30 + 10,
        # MLP 3 x 40 x 56, block norms 2 x 40; then final norm 40 and the LM head 97 x 40.
        t = tiny_config()
        per_layer = 2 * 40 * 30 + 2 * 40 * 10 + 30 + 10 + 3 * 40 * 56 + 2 * 40
        dense = 2 * per_layer + 40 + 97 * 40
        assert flops_per_token(t, 7) == 6 * dense + 2 * (12 * 3 * 10 * (7 * 8 // 2) // 7)
        with pytest.raises(ValueError, match="seq_len must be a positive int"):
            flops_per_token(t, 0)


# --------------------------------------------------------------------------- construction and init
class TestInit:
    def test_meta_build_has_hf_names_and_no_storage(self):
        model = Olmo2ForCausalLM.from_config(tiny_config(), device="meta")
        assert all(p.is_meta for p in model.parameters())
        names = set(dict(model.named_parameters()))
        layer = {f"model.layers.0.{n}.weight" for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
            "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm",
            "post_feedforward_layernorm")}
        assert layer <= names
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
        assert len(names) == 3 + 2 * len(layer)
        assert isinstance(model.model.layers, torch.nn.ModuleList)
        assert not list(model.buffers())

    def test_truncated_normal_and_ones(self):
        model = Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test"), generator=torch.Generator().manual_seed(0))
        for name, p in model.named_parameters():
            if "norm" in name:
                assert torch.equal(p, torch.ones_like(p)), name
            else:
                assert p.abs().max() <= 3 * 0.02 + 1e-7, name
                if p.numel() > 10_000:
                    # A normal truncated at +-3 std keeps 98.9% of the variance.
                    assert abs(p.std().item() - 0.02 * math.sqrt(0.9733)) < 1e-3, name
                    assert abs(p.mean().item()) < 1e-3, name

    def test_deterministic_and_dtype_independent(self):
        config = tiny_config()
        a = Olmo2ForCausalLM.from_config(config, generator=torch.Generator().manual_seed(3))
        b = Olmo2ForCausalLM.from_config(config, generator=torch.Generator().manual_seed(3))
        c = Olmo2ForCausalLM.from_config(config, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
        d = Olmo2ForCausalLM.from_config(config, generator=torch.Generator().manual_seed(4))
        for (name, pa), pb, pc, pd in zip(a.named_parameters(), b.parameters(), c.parameters(), d.parameters()):
            assert torch.equal(pa, pb), name
            assert pc.dtype == torch.bfloat16 and torch.equal(pa.to(torch.bfloat16), pc), name
            if "norm" not in name:
                assert not torch.equal(pa, pd), name
        torch.manual_seed(5)
        e = Olmo2ForCausalLM(config)
        torch.manual_seed(5)
        f = Olmo2ForCausalLM(config)
        assert all(torch.equal(x, y) for x, y in zip(e.parameters(), f.parameters()))

    def test_config_type(self):
        with pytest.raises(TypeError, match="config must be an Olmo2Config"):
            Olmo2ForCausalLM({"vocab_size": 3})


# --------------------------------------------------------------------------- loss
def reference_losses(model, ids, labels, z_loss_coef):
    """Loss from the full logits, in float64: the definition."""
    logits = model(ids).logits.double()
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    valid = targets != -100
    lse = torch.logsumexp(flat, -1)
    ce = (lse - flat.gather(-1, targets.clamp(min=0)[:, None])[:, 0])[valid]
    return ce, z_loss_coef * lse[valid] ** 2, int(valid.sum())


class TestLoss:
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_reductions_and_z_loss(self, reduction):
        model = make_model()
        ids = torch.randint(0, 97, (3, 11))
        labels = ids.clone()
        labels[0, :4] = -100
        labels[2, 7] = -100
        ce_ref, z_ref, count = reference_losses(model, ids, labels, 1e-3)
        out = model(ids, labels=labels, z_loss_coef=1e-3, reduction=reduction)
        assert out.logits is None and out.num_tokens.item() == count == 3 * 10 - 3 - 1
        if reduction == "none":
            assert out.ce_loss.shape == (3, 11) and (out.ce_loss[:, -1] == 0).all()
            got_ce, got_z = out.ce_loss.sum(), out.z_loss.sum()
            want_ce, want_z = ce_ref.sum(), z_ref.sum()
        else:
            scale = count if reduction == "mean" else 1
            got_ce, got_z = out.ce_loss, out.z_loss
            want_ce, want_z = ce_ref.sum() / scale, z_ref.sum() / scale
        assert rel_err(got_ce, want_ce) < 1e-5
        assert rel_err(got_z, want_z) < 1e-5
        torch.testing.assert_close(out.loss, out.ce_loss + out.z_loss)

    def test_zero_coefficient_gives_plain_ce(self):
        model = make_model()
        ids = torch.randint(0, 97, (2, 9))
        out = model(ids, labels=ids)
        assert torch.equal(out.z_loss, torch.zeros_like(out.z_loss))
        assert torch.equal(out.loss, out.ce_loss)

    def test_all_ignored_gives_zero_loss_and_gradients(self):
        model = make_model()
        ids = torch.randint(0, 97, (2, 6))
        out = model(ids, labels=torch.full_like(ids, -100))
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
        assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters() if p.grad is not None)

    def test_sum_over_micro_batches_equals_full_batch_mean(self):
        """What a trainer does: sum reductions, divide by the global token count."""
        model = make_model()
        ids = torch.randint(0, 97, (4, 8))
        labels = ids.clone()
        labels[1, 2:5] = -100
        full = model(ids, labels=labels)
        parts = [model(ids[i : i + 2], labels=labels[i : i + 2], reduction="sum") for i in (0, 2)]
        total = sum(p.loss for p in parts) / sum(p.num_tokens for p in parts)
        assert rel_err(total, full.loss) < 1e-6


# --------------------------------------------------------------------------- padding, positions, cache
class TestPositionsAndCache:
    @pytest.mark.parametrize("attn_backend", ["sdpa", "eager"])
    def test_left_padding_matches_unpadded(self, attn_backend):
        model = make_model(attn_backend=attn_backend)
        short, long = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 8))
        ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(ids, attention_mask=mask, position_ids=positions).logits
        assert torch.isfinite(out).all()
        assert rel_err(out[0, 3:], model(short).logits[0]) < 1e-5
        assert rel_err(out[1], model(long).logits[0]) < 1e-5

    def test_per_row_positions(self):
        model = make_model()
        ids = torch.randint(0, 97, (2, 6))
        pos = torch.stack([torch.arange(6), torch.arange(10, 16)])
        out = model(ids, position_ids=pos).logits
        assert rel_err(out[0], model(ids[:1]).logits[0]) < 1e-6
        assert rel_err(out[1], model(ids[1:], position_ids=pos[1]).logits[0]) < 1e-6

    @pytest.mark.parametrize("attn_backend", ["sdpa", "eager"])
    def test_cache_steps_match_full_forward(self, attn_backend):
        model = make_model(attn_backend=attn_backend)
        ids = torch.randint(0, 97, (2, 10))
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        cache = out.past_key_values
        pieces = [out.logits]
        for chunk in (ids[:, 4:5], ids[:, 5:8], ids[:, 8:9], ids[:, 9:]):  # single tokens and chunks after a cache
            out = model(chunk, past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
        assert cache.get_seq_length() == 10
        assert rel_err(torch.cat(pieces, 1), full) < 1e-5

    def test_cache_with_padding_mask(self):
        model = make_model()
        ids = torch.randint(0, 97, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        first = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], use_cache=True)
        rest = model(ids[:, 5:], attention_mask=mask, position_ids=pos[:, 5:], past_key_values=first.past_key_values)
        assert rel_err(torch.cat([first.logits, rest.logits], 1)[mask.bool()], full[mask.bool()]) < 1e-5


# --------------------------------------------------------------------------- backends
def forward_backward(model, ids, labels):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    out = model(ids, labels=labels, z_loss_coef=1e-4)
    out.loss.backward()
    return logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


class TestBackends:
    def test_sdpa_equals_eager(self):
        model = make_model(attn_backend="eager")
        ids = torch.randint(0, 97, (2, 9))
        labels = ids.clone()
        labels[0, 2] = -100
        ref = forward_backward(model, ids, labels)
        model.set_attn_backend("sdpa")
        got = forward_backward(model, ids, labels)
        assert rel_err(got[0], ref[0]) < 1e-5 and rel_err(got[1], ref[1]) < 1e-5
        for name in ref[2]:
            assert rel_err(got[2][name], ref[2][name]) < 1e-4, name

    def test_flash_attn_reason(self):
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            with pytest.raises(ImportError, match="needs the flash-attn package"):
                make_model().set_attn_backend("flash_attn")
            pytest.skip(f"flash-attn not importable here ({type(exc).__name__}); checked the error instead")
        if not torch.cuda.is_available():
            pytest.skip("flash-attn needs a CUDA device")
        model = make_model(head_dim=16, hidden_size=48).to("cuda", torch.bfloat16)
        ids = torch.randint(0, 97, (2, 9), device="cuda")
        ref = model(ids).logits.float()
        model.set_attn_backend("flash_attn")
        assert rel_err(model(ids).logits.float(), ref) < 2e-2

    @pytest.mark.parametrize("kernel_backend", ["torch", "triton", "cpu"])
    def test_kernel_backend_matches_torch(self, kernel_backend):
        reason = backend_skip_reason(kernel_backend)
        if reason:
            pytest.skip(reason)
        model = make_model()
        ids = torch.randint(0, 97, (2, 7))
        labels = ids.clone()
        labels[1, :3] = -100
        with olmo2_kernels.use_backend("torch"):
            ref = forward_backward(model, ids, labels)
        with olmo2_kernels.use_backend(kernel_backend):
            got = forward_backward(model, ids, labels)
        assert rel_err(got[0], ref[0]) < LOGITS_RTOL
        assert rel_err(got[1], ref[1]) < LOGITS_RTOL
        for name in ref[2]:
            assert rel_err(got[2][name], ref[2][name]) < GRAD_RTOL, name

    def test_compile_fullgraph(self):
        model = make_model(num_hidden_layers=1)  # one block: compile time grows with depth
        ids = torch.randint(0, 97, (2, 7))
        labels = ids.clone()
        labels[0, :2] = -100  # ignored tokens inside the compiled graph
        expected = model(ids, labels=labels, z_loss_coef=1e-4).loss
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(ids, labels=labels, z_loss_coef=1e-4).loss
        got.backward()
        assert rel_err(got, expected) < 1e-6
        assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- bad input
class TestBadInput:
    @pytest.mark.parametrize("bad", [97, -1, 1000])
    def test_token_out_of_range(self, bad):
        model = make_model()
        ids = torch.randint(0, 97, (2, 5))
        ids[1, 3] = bad
        with pytest.raises(ValueError, match=rf"input_ids must be in \[0, vocab_size=97\); input_ids\[1, 3\] = {bad}"):
            model(ids)

    def test_label_out_of_range(self):
        model = make_model()
        ids = torch.randint(0, 97, (2, 5))
        labels = ids.clone()
        labels[0, 2] = 97
        with pytest.raises(ValueError, match=r"labels must be in \[0, vocab_size=97\) or -100; labels\[0, 2\] = 97"):
            model(ids, labels=labels)

    def test_types_and_shapes(self):
        model = make_model()
        ids = torch.randint(0, 97, (2, 5))
        with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
            model(ids.float())
        with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
            model([[1, 2]])
        with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq\)"):
            model(ids[0])
        with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
            model(ids, labels=ids[:, :4])
        with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, past \+ seq\) = \(2, 5\)"):
            model(ids, attention_mask=torch.ones(2, 4))
        with pytest.raises(ValueError, match="position_ids must have shape"):
            model(ids, position_ids=torch.arange(4))
        with pytest.raises(ValueError, match="reduction must be one of"):
            model(ids, labels=ids, reduction="avg")
        with pytest.raises(ValueError, match="attn_backend must be one of"):
            model.set_attn_backend("flex")


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: bf16 kernels on CUDA")
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
def test_gpu_bf16_matches_fp32(gpu_backend):
    for op in MODEL_OPS:
        reason = _backend.unavailable_reason(gpu_backend, "cuda", op)
        if reason:
            pytest.skip(f"backend {gpu_backend!r} cannot run {op}: {reason}")
    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         intermediate_size=688, vocab_size=1000)
    ref_model = make_model(config).cuda()
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    with olmo2_kernels.use_backend("torch"):
        ref = forward_backward(ref_model, ids, ids)
    model = make_model(config).to("cuda", torch.bfloat16)
    with olmo2_kernels.use_backend(gpu_backend):
        got = forward_backward(model, ids, ids)
    # bf16 keeps 8 significant bits (0.4% per rounding) through ~30 roundings:
    # a few percent at the largest logit, the mean loss far tighter.
    assert rel_err(got[0].float(), ref[0]) < 5e-2
    assert rel_err(got[1], ref[1]) < 1e-2
    for name in ref[2]:
        assert rel_err(got[2][name].float(), ref[2][name]) < 1e-1, name


def test_loss_under_autocast_runs_the_head_in_the_autocast_dtype(monkeypatch):
    import olmo2_kernels as ok
    from olmo2 import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config.preset("olmo2-test")
    model = Olmo2ForCausalLM.from_config(config, device="cpu")
    ids = torch.randint(0, config.vocab_size, (2, 9))
    seen = {}
    real = ok.linear_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        seen["dtypes"] = (hidden.dtype, weight.dtype)
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(ok, "linear_cross_entropy", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert seen["dtypes"] == (torch.bfloat16, torch.bfloat16)
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    fp32 = model(ids, labels=ids).ce_loss
    assert abs(out.ce_loss.item() - fp32.item()) < 5e-2 * fp32.item()
