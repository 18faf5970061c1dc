"""olmo2.dpo: fused sequence log-probs, the DPO losses and gradients against plain float64, the cached reference, a tiny run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from olmo2.chat import CHAT_TEMPLATE, IGNORE_INDEX
from olmo2.checkpoint_hf import save_pretrained
from olmo2.dpo import DPOConfig, dpo_loss, heldout_metrics, pair_batch, reference_logps, sequence_logps

from test_sft import VOCAB, tiny


def pairs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, VOCAB, (4 + i,), generator=g).tolist()
        pair = {}
        for key, length in (("chosen", 3 + i), ("rejected", 6 - i)):
            resp = torch.randint(0, VOCAB, (length,), generator=g).tolist()
            pair[key] = (prompt + resp, [IGNORE_INDEX] * len(prompt) + resp)
        out.append(pair)
    return out


def plain_logps(model, batch):
    """float64 log-probs from materialized logits: the spec."""
    logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits.double()
    targets = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    mask = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    return picked.sum(1), mask.sum(1)


def plain_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta, kind, gamma):
    if kind == "dpo_norm":
        z = beta * ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r)
    elif kind == "dpo":
        z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    else:
        z = beta * (pi_c / n_c - pi_r / n_r) - gamma
    return -torch.log(torch.sigmoid(z))


def test_sequence_logps_match_plain_logits():
    model = tiny()
    b = pair_batch(pairs(), pad_id=0)
    ours, counts = sequence_logps(model, b)
    ref, ref_counts = plain_logps(model, b)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["dpo_norm", "dpo", "simpo"])
def test_loss_and_gradients_match_plain_float64(kind):
    data = pairs(seed=2)
    model = tiny(seed=3)
    b = pair_batch(data, pad_id=0)
    n = len(data)
    ref_model = tiny(seed=4)
    with torch.no_grad():
        ref, _ = sequence_logps(ref_model, b)
    logps, counts = sequence_logps(model, b)
    losses, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], counts[:n], counts[n:], 2.0, kind, 0.3)
    losses.mean().backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    plain, c = plain_logps(model, b)
    expected = plain_loss(plain[:n], plain[n:], ref[:n].double(), ref[n:].double(), c[:n], c[n:], 2.0, kind, 0.3)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)
    expected.mean().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    assert metrics["accuracy"].shape == (n,)


@torch.no_grad()
def plain_heldout(model, data, ref, beta, kind, gamma):
    """float64 spec of the held-out metrics: materialized logits over all pairs at once, the means over pairs."""
    n = len(data)
    pi, c = plain_logps(model, pair_batch(data, pad_id=0))
    ref = ref.double()
    z = plain_loss(pi[:n], pi[n:], ref[:, 0], ref[:, 1], c[:n], c[n:], beta, kind, gamma)
    if kind == "dpo_norm":
        chosen, rejected = (pi[:n] - ref[:, 0]) / c[:n], (pi[n:] - ref[:, 1]) / c[n:]
    elif kind == "dpo":
        chosen, rejected = pi[:n] - ref[:, 0], pi[n:] - ref[:, 1]
    else:
        chosen, rejected = pi[:n] / c[:n], pi[n:] / c[n:]
    r_c, r_r = beta * chosen, beta * rejected
    return {"loss": z.mean(), "accuracy": (r_c > r_r).double().mean(), "margin": (r_c - r_r).mean(),
            "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(), "logp_chosen": pi[:n].mean(),
            "logp_rejected": pi[n:].mean()}


@pytest.mark.parametrize("kind", ["dpo_norm", "dpo", "simpo"])
def test_heldout_metrics_equal_float64_from_model_and_cached_reference(kind):
    """5 pairs in batches of 2 (the last one short): every metric the float64 mean over the pairs, from the
    policy's materialized logits and the cached reference of another model (so the rewards are not 0)."""
    data = pairs(5, seed=9)
    model, ref_model = tiny(seed=10), tiny(seed=11)
    ref = reference_logps(ref_model, data, pad_id=0, batch_size=2, device="cpu")
    cfg = DPOConfig(loss_type=kind, beta=2.0, gamma=0.3)
    got = heldout_metrics(model, data, None if kind == "simpo" else ref, 0, 2, cfg, "cpu")
    want = plain_heldout(model, data, ref, 2.0, kind, 0.3)
    assert got.keys() == want.keys() and model.training
    assert 0.0 < got["accuracy"] < 1.0 and got["margin"] != 0.0
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_cached_reference_equals_live_model():
    data = pairs(4, seed=5)
    model = tiny(seed=6)
    cached = reference_logps(model, data, pad_id=0, batch_size=3, device="cpu")
    for i, p in enumerate(data):
        live, _ = sequence_logps(model, pair_batch([p], pad_id=0))
        torch.testing.assert_close(cached[i], live.detach(), rtol=1e-5, atol=1e-5)


def test_dpo_cli_tiny_run_raises_margin(tmp_path, capsys):
    from olmo2.cli.dpo import main
    from olmo2.tokenizers import save_tokenizer

    base = tmp_path / "base"
    save_pretrained(tiny(vocab=100352), base)
    save_tokenizer("dolma2", base)
    data = tmp_path / "prefs.jsonl"
    lines = []
    for a in range(6):
        prompt = [{"role": "user", "content": f"Add {a} and {a + 1}"}]
        lines.append(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{2 * a + 1}"}],
                                 "rejected": [{"role": "assistant", "content": f"{2 * a + 2} maybe"}]}))
    lines.insert(2, json.dumps({"prompt": [], "chosen": [{"role": "assistant", "content": ""}], "rejected": []}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "dpo"
    assert main(["--model", str(base), "--data", str(data), "--output", str(out), "max_length=64",
                 "micro_batch_size=3", "grad_accum=2", "lr=5e-3", "beta=1.0", "warmup_ratio=0.0", "epochs=6",
                 "max_steps=5", "device=cpu"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["steps"] == 5 and result["bad_records"] == 1 and "line 3: chosen:" in captured.err
    assert result["first"]["margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert result["last"]["margin"] > 0.05 and result["last"]["accuracy"] == 1.0
    assert torch.load(out / "reference_logps.pt")["logps"].shape == (6, 2)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5] and lines[-1]["margin"] == result["last"]["margin"]
    assert {"loss", "accuracy", "logp_chosen", "logp_rejected", "lr"} <= set(lines[0])
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_dpo_cli_dry_run_and_errors(capsys):
    import yaml

    from olmo2.cli.dpo import main

    assert main(["--model", "m", "--data", "d", "--output", "o", "--preset", "olmo2_7b", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["loss_type"] == "dpo_norm" and cfg["beta"] == 5.0 and cfg["lr"] == 5e-7
    assert main(["--model", "m", "--data", "d", "--output", "o", "loss_type=ipo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo2-dpo: ") and "loss_type must be one of" in err and err.count("\n") == 1


def test_dpo_step_allocates_no_batch_by_tokens_by_vocab_tensor():
    """Peak tensor memory of a DPO forward and backward stays far below the (B, T, V) logits."""
    from memtrack import PeakAllocations

    vocab = 8192
    model = tiny(vocab=vocab)
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(2):
        prompt = torch.randint(0, vocab, (150,), generator=g).tolist()
        pair = {}
        for key in ("chosen", "rejected"):
            resp = torch.randint(0, vocab, (100,), generator=g).tolist()
            pair[key] = (prompt + resp, [IGNORE_INDEX] * len(prompt) + resp)
        data.append(pair)
    b = pair_batch(data, pad_id=0)
    full_logits_bytes = b["input_ids"].numel() * vocab * 4
    with PeakAllocations() as mem:
        logps, counts = sequence_logps(model, b)
        losses, _ = dpo_loss(logps[:2], logps[2:], logps[:2].detach() - 1, logps[2:].detach(), counts[:2], counts[2:], 5.0)
        losses.mean().backward()
    assert mem.peak < full_logits_bytes / 2, (mem.peak, full_logits_bytes)
    with PeakAllocations() as naive, torch.no_grad():
        model(b["input_ids"])
    assert naive.peak >= full_logits_bytes


def _dpo_resume_setup(tmp_path):
    from olmo2.cli.dpo import main
    from olmo2.tokenizers import save_tokenizer

    base = tmp_path / "base"
    save_pretrained(tiny(vocab=258), base)  # the byte tokenizer: a small checkpoint
    save_tokenizer("byte", base)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Add {a} and {a + 1}"}],
                                        "chosen": [{"role": "assistant", "content": f"{2 * a + 1}"}],
                                        "rejected": [{"role": "assistant", "content": f"{2 * a + 2} maybe"}]}) + "\n"
                            for a in range(6)))
    # 6 pairs, 3 steps an epoch: step 4 is in the second epoch
    keys = ["max_length=64", "micro_batch_size=1", "grad_accum=2", "lr=5e-3", "beta=1.0", "warmup_ratio=0.25",
            "epochs=2", "max_steps=4", "save_interval=3", "device=cpu"]

    def run(out, *extra):
        return main(["--data", str(data), "--model", str(base), "--output", str(tmp_path / out), *keys, *extra])

    return run, data


def test_dpo_resume_is_exact(tmp_path, capsys):
    """4 steps straight vs 2 steps, stop, rerun of the same command to 4: bitwise equal weights; the resumed
    run reads the cached reference log-probs instead of recomputing them from the (trained) checkpoint."""
    from safetensors.torch import load_file

    run, _ = _dpo_resume_setup(tmp_path)
    assert run("straight") == 0
    assert run("resumed", "hard_stop=2") == 0
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert run("resumed") == 0
    err = capsys.readouterr().err
    assert "at step 2 (epoch 0, item 4)" in err and "reference log-probs of 6 pairs read from" in err
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step00000004" / "trainer.json").read_text())
    assert state["ref_cache"] == str(tmp_path / "resumed" / "reference_logps.pt")
    (tmp_path / "resumed" / "reference_logps.pt").unlink()
    assert run("resumed") == 2  # without the cache the reference is gone: refuse, never use the trained policy
    assert "reference_logps.pt: missing" in capsys.readouterr().err


def test_dpo_resume_refuses_another_reference_cache_or_data(tmp_path, capsys):
    """The checkpoint records the reference cache's and the data's sha256: a resume with a different
    reference file, or different data of the same size, is refused in one line naming both."""
    from olmo2.files import file_digest

    run, data = _dpo_resume_setup(tmp_path)
    assert run("resumed", "hard_stop=2") == 0
    out = tmp_path / "resumed"
    state = json.loads((out / "checkpoints" / "step00000002" / "trainer.json").read_text())
    cache = out / "reference_logps.pt"
    assert state["ref_cache_sha256"] == file_digest(cache) and state["data_sha256"] == file_digest(data)
    capsys.readouterr()

    original = cache.read_bytes()
    saved = torch.load(cache)
    saved["logps"] = saved["logps"] + 0.5  # same shape, another reference
    torch.save(saved, cache)
    assert run("resumed") == 2
    err = capsys.readouterr().err.splitlines()[-1]  # the error line, after the run's progress lines
    assert err.startswith(f"olmo2-dpo: ref_cache {cache} (sha256 {file_digest(cache)[:16]}) is not the reference")
    assert f"checkpoint {out / 'checkpoints' / 'step00000002'} was trained with ({cache}, sha256 " \
           f"{state['ref_cache_sha256'][:16]})" in err
    cache.write_bytes(original)

    text = data.read_text()
    data.write_text(text.replace("Add 0 and 1", "Add 0 and 2"))  # same number of pairs, other data
    assert run("resumed") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"olmo2-dpo: --data {data} (sha256 {file_digest(data)[:16]}) is not the data checkpoint")
    assert f"sha256 {state['data_sha256'][:16]}" in err
    data.write_text(text)
    assert run("resumed") == 0  # both restored: it continues
    assert "at step 2 (epoch 0, item 4)" in capsys.readouterr().err


def test_reference_cache_that_is_not_one_is_a_one_line_error(tmp_path):
    """ref_cache names a user's file: a damaged one or another .pt is refused naming it, not a traceback."""
    from olmo2.dpo import load_reference

    path = tmp_path / "ref.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=rf"ref_cache {path}: not a reference log-prob file"):
        load_reference(path, 3)
    torch.save({"weights": torch.zeros(3, 2)}, path)
    with pytest.raises(ValueError, match=rf"ref_cache {path}: not a reference log-prob file"):
        load_reference(path, 3)
    torch.save({"logps": torch.zeros(3, 2)}, path)
    assert load_reference(path, 3)[0].shape == (3, 2)


def test_dpo_eval_in_loop_matches_the_model_and_cache_and_leaves_training_bitwise(tmp_path, capsys):
    """Held-out pairs evaluated at the start and after every step, stopped at step 2 and resumed: the weights
    are bitwise those of a run without evaluation; the held-out reference is cached once in its own file (read
    back on resume, recorded in the checkpoint); the last held-out metrics equal the float64 ones of the
    exported model and that cache; a bad record is reported by line; a held-out file changed under its cache
    is refused."""
    from safetensors.torch import load_file

    from olmo2.chat import read_preference_jsonl
    from olmo2.checkpoint_hf import load_pretrained
    from olmo2.files import file_digest
    from olmo2.tokenizers import load_tokenizer

    run, _ = _dpo_resume_setup(tmp_path)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Add {a} and {a + 1}"}],
                                        "chosen": [{"role": "assistant", "content": f"{2 * a + 1}"}],
                                        "rejected": [{"role": "assistant", "content": f"{2 * a} maybe"}]}) + "\n"
                            for a in range(20, 24)) + "[1, 2]\n")
    evaluated = [f"eval.data={held}", "eval.interval=1", "eval.at_start=true"]
    assert run("plain") == 0
    assert run("evaluated", *evaluated, "hard_stop=2") == 0
    assert run("evaluated", *evaluated) == 0
    err = capsys.readouterr().err
    out = tmp_path / "evaluated"
    cache = out / "reference_logps_eval.pt"
    assert "4 of 5 records kept, 1 skipped (line 5: record must be an object" in err
    assert f"held-out reference log-probs of 4 pairs read from {cache}" in err
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in x]
    assert [x["step"] for x in evals] == [0, 1, 2, 3, 4]
    # step 0: the policy is the reference, scored in the same batches: margin exactly 0, loss log 2
    assert evals[0]["eval/margin"] == 0.0 and evals[0]["eval/loss"] == pytest.approx(math.log(2), rel=1e-6)
    state = json.loads((out / "checkpoints" / "step00000004" / "trainer.json").read_text())
    assert state["eval_ref_cache"] == str(cache) and state["eval_ref_cache_sha256"] == file_digest(cache)
    saved = torch.load(cache)
    assert saved["data_sha256"] == file_digest(held) and saved["model"] == str(tmp_path / "base")
    data, _ = read_preference_jsonl(held, load_tokenizer(str(tmp_path / "base")), 64)
    want = plain_heldout(load_pretrained(out), data, saved["logps"], 1.0, "dpo_norm", 0.5)
    for key, value in want.items():
        assert evals[-1][f"eval/{key}"] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    assert evals[-1]["eval/margin"] > evals[0]["eval/margin"]

    held.write_text(held.read_text().replace("Add 20 and 21", "Add 20 and 22"))  # same size, other pairs
    assert run("evaluated", *evaluated) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"olmo2-dpo: eval.ref_cache {cache}: computed with data_sha256") and "delete" in err
