"""olmo2.rl.grpo: group advantages, the GRPO loss and gradients against plain float64, log-probs of the
fused path against a fresh forward and the sampler, and no (B, T, V) tensor in an update."""
import math

import pytest
import torch

from olmo2.chat import IGNORE_INDEX
from olmo2.generation import sample
from olmo2.rl.grpo import completion_mask, group_advantages, grpo_loss, token_logps, token_weights
from olmo2.sft import Row, collate

from test_sft import VOCAB, tiny


# --------------------------------------------------------------------------- advantages
def test_equal_rewards_give_exact_zero_advantages():
    rewards = torch.tensor([10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    for scale in ("std", "none"):
        adv = group_advantages(rewards, k=3, scale=scale)
        assert not torch.isnan(adv).any()
        assert torch.equal(adv[:9], torch.zeros(9))  # 0.1 * 3 / 3 != 0.1 in floating point: still exactly 0
        assert adv[9] > 0 and adv[10] < 0 and adv[10] == adv[11]


def test_advantages_against_plain_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = group_advantages(rewards, k=4, scale="std", eps=1e-6)
    dr = group_advantages(rewards, k=4, scale="none")
    for g in range(2):
        r = [float(x) for x in rewards[4 * g : 4 * g + 4]]
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)  # population std (ddof 0)
        for i in range(4):
            assert adv[4 * g + i].item() == pytest.approx((r[i] - mean) / (std + 1e-6), rel=1e-6)
            assert dr[4 * g + i].item() == pytest.approx(r[i] - mean, rel=1e-6)
    with pytest.raises(ValueError, match="multiple of k=3"):
        group_advantages(rewards, k=3)


# --------------------------------------------------------------------------- loss and gradients
def rollout_rows(seed=0):
    """Four prompt + completion rows of different lengths (completions 1, 3, 6, 8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (p_len, c_len) in enumerate([(5, 3), (3, 8), (7, 1), (4, 6)]):
        ids = torch.randint(0, VOCAB, (p_len + c_len,), generator=g).tolist()
        labels = [IGNORE_INDEX] * p_len + ids[p_len:]
        rows.append(Row(ids, labels, list(range(len(ids))), [0] * len(ids)))
    return rows


def plain_token_logps(model, batch):
    """float64 log p of each next token from materialized logits: the spec."""
    logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits.double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]


def plain_grpo(logp, old, ref, adv, rows, aggregation, clip_eps, beta, max_new):
    """The GRPO objective written token by token, in float64."""
    per_seq = []
    for b, row in enumerate(rows):
        start = sum(1 for x in row.labels if x == IGNORE_INDEX) - 1
        terms = []
        for t in range(start, len(row.ids) - 1):
            ratio = torch.exp(logp[b, t] - old[b, t])
            clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
            term = -torch.minimum(ratio * adv[b], clipped * adv[b])
            d = ref[b, t] - logp[b, t]
            terms.append(term + beta * (torch.exp(d) - d - 1))
        per_seq.append(terms)
    if aggregation == "token":
        return sum(sum(t) for t in per_seq) / sum(len(t) for t in per_seq)
    if aggregation == "sequence":
        return sum(sum(t) / len(t) for t in per_seq) / len(per_seq)
    return sum(sum(t) for t in per_seq) / (len(per_seq) * max_new)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_loss_and_gradients_match_plain_float64(aggregation):
    rows = rollout_rows()
    b = collate(rows, pad_id=0, packing=False)
    model, ref_model = tiny(seed=3), tiny(seed=4)
    mask = completion_mask(b["labels"])
    with torch.no_grad():
        ref = token_logps(ref_model, b).double()
        fresh = token_logps(model, b).double()
    g = torch.Generator().manual_seed(5)
    old = fresh + 0.6 * torch.randn(fresh.shape, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    adv = torch.tensor([1.5, -0.7, 0.9, -1.2], dtype=torch.float64)
    clip_eps, beta, max_new = 0.2, 0.1, 10
    weights = torch.tensor(token_weights([len(r.ids) - sum(x == IGNORE_INDEX for x in r.labels) for r in rows],
                                         aggregation, max_new), dtype=torch.float64)

    loss, stats = grpo_loss(token_logps(model, b), old, ref, adv, weights, mask, clip_eps, beta)
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    plain_lp = plain_token_logps(model, b)
    expected = plain_grpo(plain_lp, old, ref, adv, rows, aggregation, clip_eps, beta, max_new)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k], p.grad.float(), rtol=1e-4, atol=1e-6, msg=k)
    assert stats["tokens"] == 18
    assert 0 < stats["clipped"] < 18  # clipped and unclipped tokens both present
    assert stats["kl"] > 0


def test_gradient_does_not_depend_on_the_micro_batch_split():
    rows = rollout_rows(seed=1)
    model = tiny(seed=2)
    lengths = [len(r.ids) - sum(x == IGNORE_INDEX for x in r.labels) for r in rows]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = []
    for split in (4, 1):
        weights = token_weights(lengths, "token", 8)
        for i in range(0, 4, split):
            b = collate(rows[i : i + split], 0, packing=False)
            with torch.no_grad():
                old = token_logps(model, b)
            loss, _ = grpo_loss(token_logps(model, b), old, None, adv[i : i + split],
                                torch.tensor(weights[i : i + split]), completion_mask(b["labels"]))
            loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_token_weights_of_rank_shares_are_one_process_weights(aggregation):
    """Ranks holding parts of a mini-batch weigh their completions as one process does, given
    the mini-batch's global completion and token counts (what the RL loop all-reduces)."""
    lengths = [3, 1, 7, 4, 2]
    whole = token_weights(lengths, aggregation, 8)
    mine, theirs = [0, 2, 4], [1, 3]  # ranks' shares, interleaved
    for share in (mine, theirs):
        got = token_weights([lengths[i] for i in share], aggregation, 8, n_sequences=5, n_tokens=sum(lengths))
        assert got == [whole[i] for i in share]


def test_beta_zero_without_reference_and_kl_needs_it():
    rows = rollout_rows()
    b = collate(rows, 0, packing=False)
    lp = token_logps(tiny(), b)
    mask = completion_mask(b["labels"])
    w = torch.full((4,), 0.1)
    loss, stats = grpo_loss(lp, lp.detach(), None, torch.zeros(4), w, mask)
    assert loss.item() == 0.0 and stats["kl"] == 0
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        grpo_loss(lp, lp.detach(), None, torch.zeros(4), w, mask, beta=0.1)


def test_kl_of_a_token_the_policy_ruled_out_stays_finite():
    logps = torch.tensor([[-120.0, -0.5]], requires_grad=True)  # ref - logp = 119.5: exp() overflows fp32
    ref = torch.tensor([[-0.5, -0.5]])
    mask = torch.tensor([[True, True]])
    loss, stats = grpo_loss(logps, logps.detach(), ref, torch.zeros(1), torch.tensor([0.5]), mask, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all() and torch.isfinite(stats["kl"])
    assert stats["kl"] == pytest.approx(math.exp(40.0) - 41.0, rel=1e-5)  # clamped at 40


# --------------------------------------------------------------------------- log-probs of the loss
def test_loss_logps_equal_fresh_forward_and_sampler_so_first_ratio_is_one():
    """The sampler's log-probs (decode pass) = the fused token log-probs of the loss = materialized
    float64 log-probs of a fresh forward; at the first update the ratio is 1 and nothing is clipped."""
    model = tiny(seed=6).eval()
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1, 4, 6]]
    s = sample(model, prompts, k=3, max_new_tokens=9, temperature=1.0, eos_token_id=[0, 1],
               generator=torch.Generator().manual_seed(0))
    rows = []
    for i, tokens in enumerate(s.tokens):
        p = prompts[s.prompt_index[i]]
        rows.append(Row(p + tokens, [IGNORE_INDEX] * len(p) + tokens, list(range(len(p) + len(tokens))), []))
    b = collate(rows, 0, packing=False)
    mask = completion_mask(b["labels"])
    fused = token_logps(model, b)
    with torch.no_grad():
        plain = plain_token_logps(model, b)
    sampler = [torch.tensor(x, dtype=torch.float64) for x in s.logprobs]
    for r in range(len(rows)):
        torch.testing.assert_close(fused[r][mask[r]].double(), plain[r][mask[r]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[r][mask[r]].double(), sampler[r], rtol=1e-5, atol=1e-5)
    old = torch.zeros_like(plain)
    for r in range(len(rows)):
        old[r][mask[r]] = sampler[r]
    weights = torch.tensor(token_weights([len(t) for t in s.tokens], "token", 9))
    _, stats = grpo_loss(fused, old, None, torch.randn(len(rows)), weights, mask)
    assert stats["clipped"] == 0
    assert abs(stats["ratio"] / stats["tokens"] - 1) < 1e-5


# --------------------------------------------------------------------------- memory
def test_update_never_allocates_batch_by_time_by_vocab():
    """Peak tensor memory of a GRPO forward and backward stays under half of one (B, T, V) fp32 logits copy."""
    from memtrack import PeakAllocations

    vocab = 8192
    model = tiny(vocab=vocab)
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (250,), generator=g).tolist()
        rows.append(Row(ids, [IGNORE_INDEX] * 100 + ids[100:], list(range(250)), []))
    b = collate(rows, 0, packing=False)
    full_logits_bytes = b["input_ids"].numel() * vocab * 4
    mask = completion_mask(b["labels"])
    with torch.no_grad():
        old = token_logps(model, b)
    with PeakAllocations() as mem:
        lp = token_logps(model, b)
        loss, _ = grpo_loss(lp, old, old - 0.1, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                            torch.full((4,), 1 / 600), mask, beta=0.05)
        loss.backward()
    assert mem.peak < full_logits_bytes / 2, (mem.peak, full_logits_bytes)
