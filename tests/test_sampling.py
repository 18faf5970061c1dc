"""olmo2.generation.sample, the batched sampling of RL: log-probs against a fresh
teacher-forced forward, left padding against each prompt alone, k samples from
one prefill, eos and stop sequences per row, batches dropping finished rows,
reproducibility and input errors. Tiny fp32 models on CPU (about 2 s)."""
import pytest
import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM, generate
from olmo2.generation import Samples, sample

VOCAB = 40


def tiny_model(seed: int = 0, **overrides) -> Olmo2ForCausalLM:
    """Random weights wide enough (std 0.2, norms around 1) that the next-token
    distributions are far from uniform, so wrong positions or caches show."""
    config = Olmo2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         eos_token_id=None, pad_token_id=None, **overrides)
    gen = torch.Generator().manual_seed(seed)
    model = Olmo2ForCausalLM.from_config(config, generator=gen).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def prompts_of(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def teacher_forced_logprobs(model, prompt, completion):
    """log p of each completion token from one full forward of prompt + completion, float64 softmax."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[positions, torch.tensor(completion)]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_a_fresh_forward(temperature, top_p):
    """Rows of prompts of 3, 7 and 11 tokens, 3 samples each, rows stopping at
    different lengths (eos is a common token here): every returned log-prob is
    the raw policy's (temperature 1, no top-p) at that position, within 1e-5."""
    model = tiny_model()
    prompts = prompts_of([3, 7, 11])
    out = sample(model, prompts, k=3, max_new_tokens=14, temperature=temperature, top_p=top_p,
                 eos_token_id=[5, 6, 7], generator=torch.Generator().manual_seed(0))
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert set(out.stop_reason) == {"eos", "length"}  # some rows finished early, others ran out
    assert len({len(t) for t in out.tokens}) > 2
    for row, (p, toks, lps, why) in enumerate(zip(out.prompt_index, out.tokens, out.logprobs, out.stop_reason)):
        assert len(toks) == len(lps) >= 1
        assert (why == "eos") == (toks[-1] in (5, 6, 7)) and not set(toks[:-1]) & {5, 6, 7}
        assert why != "length" or len(toks) == 14
        expected = teacher_forced_logprobs(model, prompts[p], toks)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, rtol=0, atol=1e-5,
                                   msg=lambda m: f"row {row}: {m}")


def test_left_padded_greedy_equals_each_prompt_alone():
    model = tiny_model()
    prompts = prompts_of([2, 9, 5, 1])
    batched = sample(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_id=[])
    for p, toks in zip(prompts, batched.tokens):
        alone = sample(model, [p], max_new_tokens=10, temperature=0.0, eos_token_id=[])
        assert toks == alone.tokens[0]
        assert toks == generate(model, torch.tensor([p]), 10, eos_token_id=[])[0, len(p):].tolist()
    assert batched.stop_reason == ["length"] * 4


def test_k_rows_share_the_prefill():
    """Greedy: the k rows of a prompt are identical; sampled: they differ, and
    each row's log-probs still match (checked above); batch_size splits rows
    without changing greedy results, also in the middle of a prompt's k rows."""
    model = tiny_model()
    prompts = prompts_of([4, 6])
    greedy = sample(model, prompts, k=3, max_new_tokens=8, temperature=0.0, eos_token_id=[])
    assert greedy.tokens[0] == greedy.tokens[1] == greedy.tokens[2] != greedy.tokens[3]
    assert greedy.tokens[3] == greedy.tokens[4] == greedy.tokens[5]
    for bs in (1, 2, 4):
        split = sample(model, prompts, k=3, max_new_tokens=8, temperature=0.0, eos_token_id=[], batch_size=bs)
        assert split.tokens == greedy.tokens and split.prompt_index == greedy.prompt_index
        # other batch shapes (padding or none) round differently, by float32 ulps
        torch.testing.assert_close(torch.tensor(split.logprobs), torch.tensor(greedy.logprobs), rtol=0, atol=1e-5)
    drawn = sample(model, prompts, k=3, max_new_tokens=8, eos_token_id=[], generator=torch.Generator().manual_seed(3))
    assert len({tuple(t) for t in drawn.tokens[:3]}) > 1


def test_reproducible_with_a_seed():
    model = tiny_model()
    prompts = prompts_of([3, 8])

    def draw(seed):
        return sample(model, prompts, k=4, max_new_tokens=12, top_p=0.95, eos_token_id=[3],
                      stop_sequences=[[1, 2]], generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert isinstance(a, Samples) and len(a) == 8
    assert a == b
    assert a.tokens != c.tokens


def test_per_prompt_generators_make_a_prompts_samples_independent_of_the_batch():
    """One generator per prompt (RL over ranks): a prompt's samples are the same alone, batched
    with other prompts, in batches of any size, with rows stopping early, and its log-probs
    are still those of a fresh forward."""
    model = tiny_model()
    prompts = prompts_of([3, 8, 5])
    options = dict(k=3, max_new_tokens=10, top_p=0.9, eos_token_id=[3], stop_sequences=[[1, 2]])

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = sample(model, prompts, generator=gens([5, 6, 7]), **options)
    split = sample(model, prompts, generator=gens([5, 6, 7]), batch_size=4, **options)  # 1 prompt per batch
    # the same tokens; log-probs up to the rounding of batched matmuls of other shapes
    assert together.tokens == split.tokens and together.stop_reason == split.stop_reason
    torch.testing.assert_close(torch.tensor(sum(split.logprobs, [])), torch.tensor(sum(together.logprobs, [])),
                               rtol=1e-5, atol=1e-5)
    assert set(together.stop_reason) & {"eos", "stop"}  # some rows ended early
    for i, seed in enumerate([5, 6, 7]):
        alone = sample(model, [prompts[i]], generator=gens([seed]), **options)
        assert alone.tokens == together.tokens[3 * i : 3 * i + 3], i
        for mine, fresh in zip(alone.logprobs, together.logprobs[3 * i : 3 * i + 3]):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(fresh), rtol=1e-5, atol=1e-5)
    other = sample(model, prompts, generator=gens([5, 9, 7]), **options)
    assert other.tokens[:3] == together.tokens[:3] and other.tokens[6:] == together.tokens[6:]
    assert other.tokens[3:6] != together.tokens[3:6]
    for row, completion in enumerate(together.tokens):
        expected = teacher_forced_logprobs(model, prompts[together.prompt_index[row]], completion)
        torch.testing.assert_close(torch.tensor(together.logprobs[row], dtype=torch.float64), expected,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        sample(model, prompts, generator=gens([1, 2]), **options)


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_sample_next_from_uniform_is_the_inverse_cdf(top_p):
    """Uniforms on a fine grid land on each token in proportion to its probability (the
    distribution sample_next draws from: temperature, top-p), never on a token of probability 0."""
    from olmo2.generation import next_probs, sample_next_from_uniform

    logits = torch.tensor([0.2, 0.0, 0.5, 0.3]).log()[None]  # token 1 has probability 0
    n = 100_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = sample_next_from_uniform(logits.expand(n, 4), 0.7, top_p, u)
    share = torch.bincount(tokens, minlength=4).double() / n
    probs = next_probs(logits, 0.7, top_p)[0].double()
    torch.testing.assert_close(share, probs / probs.sum(), rtol=0, atol=2e-5)
    assert share[1] == 0 and (share[0] == 0) == (top_p == 0.5)
    assert torch.equal(sample_next_from_uniform(logits, 0.0, 1.0, u[:1]), torch.tensor([2]))  # greedy


def test_kv_cache_select_rows():
    from olmo2.model import KVCache

    cache = KVCache(2, capacity=5)
    keys = [torch.randn(3, 2, 4, 8) for _ in range(2)]
    for layer in range(2):
        cache.update(layer, keys[layer], -keys[layer])
    cache.advance(4)
    picked = cache.select_rows(torch.tensor([2, 0, 0]), capacity=9)
    assert picked.length == 4 and picked.capacity == 9
    for layer in range(2):
        k, v = picked.update(layer, torch.zeros(3, 2, 1, 8), torch.ones(3, 2, 1, 8))
        assert k.shape == (3, 2, 5, 8) and picked._keys[layer].shape[2] == 9  # room allocated once
        assert torch.equal(k[:, :, :4], keys[layer][[2, 0, 0]]) and torch.equal(v[:, :, :4], -keys[layer][[2, 0, 0]])
        assert torch.equal(k[:, :, 4], torch.zeros(3, 2, 8)) and torch.equal(v[:, :, 4], torch.ones(3, 2, 8))
    assert torch.equal(cache.update(0, keys[0][:, :, :0], keys[0][:, :, :0])[0], keys[0])  # the source is untouched


def test_eos_and_stop_sequences_end_their_row_only(monkeypatch):
    """Stops taken from a free greedy run: the row that meets one ends right after
    it (the stop ids kept), the others go on unchanged after the batch drops it."""
    from olmo2.model import KVCache

    selected = []
    select_rows = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, rows, capacity=0: selected.append(rows.numel())
                        or select_rows(self, rows, capacity))
    model = tiny_model()
    prompts = prompts_of([5, 3, 6, 4])
    free = sample(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_id=[]).tokens
    stop = free[1][4:6]  # row 1's fifth and sixth tokens
    eos = free[2][2]
    out = sample(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_id=eos, stop_sequences=[stop])
    for row, toks in enumerate(out.tokens):
        ends = [i + 1 for i in range(len(free[row])) if free[row][i] == eos]
        ends += [i + 1 for i in range(1, len(free[row])) if free[row][i - 1 : i + 1] == stop]
        n = min(ends, default=12)
        assert toks == free[row][:n], row
        reason = "length" if not ends else ("eos" if free[row][n - 1] == eos else "stop")
        assert out.stop_reason[row] == reason, row
    assert out.stop_reason[1] in ("stop", "eos") and out.stop_reason[2] == "eos" and len(out.tokens[2]) <= 3
    assert out.tokens[1][-2:] == stop or out.stop_reason[1] == "eos"
    assert selected and min(selected) < 4  # finished rows were dropped from the batch, the rest went on unchanged


def test_stop_strings_found_across_token_boundaries():
    """Each token decodes to two digits here, so a two-character stop string can straddle two tokens (which no
    token-id sequence would match): the row ends with the token that completes the string's first occurrence."""
    model = tiny_model()
    prompts = prompts_of([5, 3, 6])

    def decode(ids):
        return "".join(f"{t:02d}" for t in ids)

    free = sample(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_id=[]).tokens
    text = decode(free[0])
    j = next(j for j in range(2, 11) if text.find(text[2 * j + 1 : 2 * j + 3]) == 2 * j + 1)
    stop = text[2 * j + 1 : 2 * j + 3]  # the second digit of token j and the first of token j + 1
    out = sample(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_id=[], stop_strings=[stop],
                 decode=decode)
    for row, toks in enumerate(out.tokens):
        first = decode(free[row]).find(stop)
        n = 12 if first < 0 else (first + len(stop) - 1) // 2 + 1
        assert toks == free[row][:n] and out.stop_reason[row] == ("length" if first < 0 else "stop"), row
    assert len(out.tokens[0]) == j + 2 and out.stop_reason[0] == "stop"


def test_max_new_tokens_zero_and_one():
    model = tiny_model()
    out = sample(model, prompts_of([2, 4]), k=2, max_new_tokens=0)
    assert out.tokens == [[]] * 4 and out.logprobs == [[]] * 4 and out.stop_reason == ["length"] * 4
    out = sample(model, prompts_of([2, 4]), k=2, max_new_tokens=1, generator=torch.Generator().manual_seed(0))
    assert all(len(t) == 1 for t in out.tokens)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[1, VOCAB]]), r"prompts\[0\]\[1\] = 40 is not a token id in \[0, vocab_size=40\)"),
    (dict(prompts="hello"), "prompts must be a list of token-id lists"),
    (dict(k=0), "k must be an int >= 1, got 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(temperature=-0.5), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(stop_sequences=[[]]), r"stop_sequences\[0\] is empty"),
    (dict(stop_strings=["</answer>"]), "stop_strings needs decode"),
    (dict(stop_strings="</answer>", decode=str), "stop_strings must be a list of strings"),
    (dict(stop_strings=[""], decode=str), r"stop_strings\[0\] must be a non-empty string"),
])
def test_bad_arguments(kwargs, message):
    model = tiny_model()
    args = dict(prompts=[[1, 2]], max_new_tokens=3) | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        sample(model, args.pop("prompts"), **args)


# --------------------------------------------------------------------------- olmo2-bench generate
def test_bench_generate_quick_cpu_run(tmp_path, capsys):
    """olmo2-bench generate at a tiny size: both implementations, every row's tokens counted, the harness's
    quantiles, the table printed again by ``report``; a batch that is no multiple of k is a one-line error."""
    import json

    from benchmarks import cli

    threads = torch.get_num_threads()
    try:
        code = cli.main(["generate", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-plots",
                         "--batch-sizes", "1,4", "--k", "2", "--prompt-len", "6", "--new-tokens", "4", "--steps", "2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    doc = json.loads((tmp_path / "generate.json").read_text())
    assert doc["kind"] == "generate" and doc["env"]["device_type"] == "cpu"
    from pathlib import Path

    if (Path(cli.__file__).resolve().parents[1] / ".git").exists():  # results name the commit they came from
        assert doc["env"]["git"]["source"] == "git" and len(doc["env"]["git"]["commit"]) == 40
    rows = {(r["impl"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {("sample", 1), ("generate", 1), ("sample", 4), ("generate", 4)}
    for (impl, batch), r in rows.items():
        assert r["status"] == "ok", r
        assert (r["prompts"], r["k"]) == ((1, 1) if batch == 1 else (2, 2))
        t = r["call"]
        assert t["repeats"] == 2 and t["q20_ms"] <= t["median_ms"] <= t["q80_ms"]
        assert r["tokens_per_s"] == pytest.approx(batch * 4 / (t["median_ms"] * 1e-3))
    assert "4 (2 x 2)" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "generate.json"), "--no-plots"]) == 0
    assert "decode tokens/s" in capsys.readouterr().out
    assert cli.main(["generate", "--quick", "--out", str(tmp_path), "--batch-sizes", "3", "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "batch size 3 is not a multiple of --k 2" in err and err.count("\n") == 1
