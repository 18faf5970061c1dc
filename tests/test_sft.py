"""olmo2.sft: packing with document masks, the split-invariant loss, the schedule, a tiny CPU run of olmo2-sft."""
import json

import pytest
import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM
from olmo2.chat import CHAT_TEMPLATE, IGNORE_INDEX
from olmo2.checkpoint_hf import load_pretrained, save_pretrained
from olmo2.model import document_mask
from olmo2.sft import Row, collate, heldout_loss, linear_schedule, pack, step_loss

VOCAB = 97


def tiny(seed=0, vocab=VOCAB, backend="sdpa"):
    cfg = Olmo2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_backend=backend, pad_token_id=None, eos_token_id=None)
    return Olmo2ForCausalLM.from_config(cfg, generator=torch.Generator().manual_seed(seed))


def conversations(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + 3 * i
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        out.append((ids, labels))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_equals_one_by_one(backend):
    convs = conversations()
    model = tiny(backend=backend)
    rows = pack(convs, max_length=64, packing=True)
    assert len(rows) == 1 and rows[0].documents[-1] == 4
    b = collate(rows, pad_id=0, packing=True)
    out = model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"],
                position_ids=b["position_ids"], reduction="none")
    out.loss.sum().backward()
    packed_grads = grads(model)
    model.zero_grad()
    losses = []
    for ids, labels in convs:
        o = model(torch.tensor([ids]), labels=torch.tensor([labels]), reduction="none")
        losses.append(o.loss[0])
        o.loss.sum().backward()
    torch.testing.assert_close(out.loss[0, : sum(len(c[0]) for c in convs)], torch.cat(losses), rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_document_mask_shape_and_checks():
    mask = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False]
    model = tiny()
    with pytest.raises(ValueError, match="4-D attention_mask must be boolean"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=mask.float())


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_does_not_depend_on_the_split(packing):
    rows = pack(conversations(8, seed=1), max_length=24, packing=packing)
    model = tiny(seed=1)
    whole, count = step_loss(model, [collate(rows, 0, packing)], "cpu")
    g_whole = grads(model)
    model.zero_grad()
    split, count2 = step_loss(model, [collate([r], 0, packing) for r in rows], "cpu")
    assert count == count2 and abs(whole - split) < 1e-5
    for name, g in grads(model).items():
        torch.testing.assert_close(g_whole[name], g, rtol=1e-4, atol=1e-7, msg=name)


@torch.no_grad()
def plain_loss_per_token(model, convs):
    """float64 spec of the held-out loss: each conversation alone, materialized logits,
    -log p of every target token summed over all conversations / their number."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ids, labels in convs:
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        total -= torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep, None]).sum()
        count += int(keep.sum())
    return float(total) / count, count


@pytest.mark.parametrize("packing", [True, False])
def test_heldout_loss_equals_float64_per_token_mean(packing):
    """Packed or padded, in micro-batches of 2 rows (the last one short): the float64 mean over target
    tokens of the conversations one by one; the model's mode is restored."""
    convs = conversations(7, seed=4)
    model = tiny(seed=2)
    rows = pack(convs, max_length=30, packing=packing)
    assert (len(rows) == 7) != packing and len(rows) % 2 == 1
    want, count = plain_loss_per_token(model, convs)
    got, got_count = heldout_loss(model, rows, 2, pad_id=0, packing=packing, device="cpu")
    assert got_count == count and model.training
    assert got == pytest.approx(want, rel=1e-5)
    model.eval()
    assert heldout_loss(model, rows, 3, 0, packing, "cpu")[0] == pytest.approx(want, rel=1e-5)
    assert not model.training


def test_no_loss_across_boundaries():
    rows = pack(conversations(3), max_length=64, packing=True)
    row = rows[0]
    starts = [i for i in range(len(row.ids)) if row.positions[i] == 0]
    assert starts == [0, 5, 13] and all(row.labels[i] == IGNORE_INDEX for i in starts)
    with pytest.raises(ValueError, match="first label must be -100"):
        pack([([1, 2], [1, 2])], 8, True)


def test_linear_warmup_then_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_sft_cli_tiny_run_lowers_loss(tmp_path, capsys):
    from olmo2.cli.sft import main
    from olmo2.tokenizers import save_tokenizer

    base = tmp_path / "base"
    save_pretrained(tiny(vocab=100352), base)
    save_tokenizer("dolma2", base)
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                                      {"role": "assistant", "content": f"{2 * a + 1}"}]}) for a in range(8)]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sft"
    args = ["--model", str(base), "--data", str(data), "--output", str(out), "max_length=64",
            "micro_batch_size=2", "grad_accum=2", "lr=2e-2", "warmup_ratio=0.1", "epochs=8", "max_steps=8",
            "device=cpu"]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["steps"] == 8 and result["bad_records"] == 1
    assert result["last_loss"] < 0.7 * result["first_loss"]
    assert "8 of 9 records kept, 1 skipped (line 4: no assistant turn)" in captured.err
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert (out / "tokenizer.json").is_file()
    load_pretrained(out)


def test_sft_cli_dry_run_preset_and_errors(capsys):
    import yaml

    from olmo2.cli.sft import main

    assert main(["--model", "m", "--data", "d", "--output", "o", "--preset", "olmo2_7b", "--dry-run", "lr=1e-5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["lr"] == 1e-5 and cfg["grad_accum"] == 128 and cfg["max_length"] == 4096
    assert cfg["preset"] == "olmo2_7b"
    for argv, start in [(["--preset", "nope"], "olmo2-sft: preset must be one of"),
                        (["lr2=3"], "olmo2-sft: lr2: Key 'lr2' not in 'SFTConfig'"),
                        (["--epochs=two"], "olmo2-sft: epochs: Value 'two' of type 'str' could not be converted"),
                        (["strategy=zero"], "olmo2-sft: SFTConfig.strategy must be one of"),
                        (["precision=bf16", "device=cpu", "--data=missing.jsonl"],
                         "olmo2-sft: precision=bf16 is for GPUs; use fp32 (or auto) on CPU"),
                        (["--config", "missing.yaml"], "olmo2-sft: --config: no such file"),
                        (["eval.data=held.jsonl"],
                         "olmo2-sft: eval.data, eval.prompts or eval.tasks is set but eval.interval is 0"),
                        (["eval.prompts=p.jsonl", "eval.interval=1", "eval.max_new_tokens=0"],
                         "olmo2-sft: eval.max_new_tokens must be >= 1, got 0"),
                        (["eval.interval=5"], "olmo2-sft: eval.interval=5 but there is nothing to evaluate"),
                        (["eval.interval=-1"], "olmo2-sft: eval.interval must be >= 0, got -1"),
                        (["eval.tasks=[nope]", "eval.interval=1"], "olmo2-sft: eval.tasks: unknown task")]:
        assert main(["--model", "m", "--data", "d", "--output", "o", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err


@pytest.mark.parametrize("stage, size", [("sft", "7b"), ("sft", "13b"), ("dpo", "7b"), ("dpo", "13b")])
def test_shipped_yaml_configs_equal_the_presets(stage, size, capsys):
    """configs/{sft,dpo}-olmo2-*.yaml resolve to the same config as --preset olmo2_* (so they cannot drift)."""
    from pathlib import Path

    import yaml

    from olmo2.cli import dpo, sft

    main = (sft if stage == "sft" else dpo).main
    path = Path(__file__).resolve().parents[1] / "configs" / f"{stage}-olmo2-{size}.yaml"
    paths = ["--model", "m", "--data", "d", "--output", "o", "--dry-run"]
    assert main([*paths, "--config", str(path)]) == 0
    from_file = yaml.safe_load(capsys.readouterr().out)
    assert main([*paths, "--preset", f"olmo2_{size}"]) == 0
    from_preset = yaml.safe_load(capsys.readouterr().out)
    assert from_preset.pop("preset") == f"olmo2_{size}" and from_file.pop("preset") == ""
    assert from_file == from_preset
    assert from_file["lr"] == {"sft-7b": 1e-5, "sft-13b": 6e-6}.get(f"{stage}-{size}", 5e-7)


def test_help_lists_the_keys_and_exits_0(capsys):
    from olmo2.cli import dpo, sft

    for main, key in ((sft.main, "packing=True"), (dpo.main, "loss_type=dpo_norm"), (sft.main, "eval.interval=0"),
                      (dpo.main, "eval.ref_cache=")):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "--config FILE" in out and key in out and "strategy=auto" in out


def _resume_setup(tmp_path):
    from olmo2.cli.sft import main
    from olmo2.tokenizers import save_tokenizer

    base = tmp_path / "base"
    save_pretrained(tiny(vocab=258), base)  # the byte tokenizer: a small checkpoint
    save_tokenizer("byte", base)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                                                     {"role": "assistant", "content": f"{2 * a + 1}"}]}) + "\n"
                            for a in range(6)))
    # 6 rows, 3 steps an epoch: step 4 is in the second epoch, so the data order is resumed across epochs
    keys = ["max_length=64", "packing=false", "micro_batch_size=1", "grad_accum=2", "lr=1e-2",
            "warmup_ratio=0.25", "epochs=2", "max_steps=4", "save_interval=3", "device=cpu"]

    def run(out, *extra):
        return main(["--data", str(data), "--model", str(base), "--output", str(tmp_path / out), *keys, *extra])

    return run


def _same_weights(a_dir, b_dir):
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_resume_is_exact(tmp_path, capsys):
    """4 steps straight vs 2 steps, stop, rerun of the same command to 4: bitwise equal weights."""
    run = _resume_setup(tmp_path)
    assert run("straight") == 0
    assert run("resumed", "hard_stop=2") == 0
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert run("resumed") == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "at step 2 (epoch 0, item 4)" in err
    assert _same_weights(tmp_path / "straight", tmp_path / "resumed")
    import yaml

    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and {"loss", "target_tokens", "lr", "epoch"} <= set(lines[0])
    assert lines[2]["epoch"] == 0 and lines[3]["epoch"] == 1  # step 4 is in the second epoch
    saved = yaml.safe_load((tmp_path / "resumed" / "checkpoints" / "step00000004" / "config.yaml").read_text())
    assert saved["lr"] == 1e-2 and saved["grad_accum"] == 2 and saved["output"] == str(tmp_path / "resumed")
    assert run("resumed", "lr=2e-2") == 2  # a changed schedule cannot continue the run
    assert "lr=0.02 differs from 0.01 in checkpoint" in capsys.readouterr().err


def test_sft_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    """The newest checkpoint damaged: resume from the one before (moving the damaged one aside), still exact."""
    run = _resume_setup(tmp_path)
    assert run("straight") == 0
    assert run("resumed", "hard_stop=2", "save_interval=1") == 0
    root = tmp_path / "resumed" / "checkpoints"
    shard = next(p for p in (root / "step00000002" / "state").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run("resumed") == 0
    err = capsys.readouterr().err
    assert "FELL BACK" in err and "at step 1 (epoch 0, item 2)" in err
    assert (root / "damaged-step00000002").is_dir()
    assert _same_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("stage", ["sft", "dpo", "rl"])
def test_output_may_not_be_the_starting_model(tmp_path, stage, capsys):
    """The export would overwrite the user's input model: refused in one line, exit 2, before any work."""
    import importlib

    main = importlib.import_module(f"olmo2.cli.{stage}").main
    model = tmp_path / "base"
    model.mkdir()
    assert main([f"--model={model}", f"--output={tmp_path}/./base", f"--data={tmp_path}/x.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output is the starting model's folder" in err[0], err


def heldout_file(path, bad=True):
    """4 held-out conversations (never in _resume_setup's data), then a bad JSON line and one with no answer."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                                      {"role": "assistant", "content": f"{2 * a + 1}"}]}) for a in range(20, 24)]
    path.write_text("\n".join(lines + (["{oops", json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
                                        if bad else [])) + "\n")
    return path


def test_sft_eval_in_loop_is_the_float64_loss_and_leaves_training_bitwise(tmp_path, capsys):
    """Evaluating before the first step and after every step (packed), stopped at step 2 and resumed: the
    weights are bitwise those of a run without evaluation; metrics.jsonl has eval/loss at steps 0-4, the first
    and last equal to the float64 loss of the base and the exported model over the first 3 held-out
    conversations (eval.max_examples); bad records reported by line."""
    from olmo2.chat import encode_chat
    from olmo2.tokenizers import load_tokenizer

    run = _resume_setup(tmp_path)
    held = heldout_file(tmp_path / "held.jsonl")
    evaluated = ["packing=true", f"eval.data={held}", "eval.interval=1", "eval.max_examples=3", "eval.at_start=true"]
    assert run("plain", "packing=true") == 0
    (tmp_path / "evaluated").mkdir()  # an attempt abandoned before its first checkpoint left its step-0 line
    (tmp_path / "evaluated" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/loss": 9.0}) + "\n")
    assert run("evaluated", *evaluated, "hard_stop=2") == 0
    assert run("evaluated", *evaluated) == 0
    err = capsys.readouterr().err
    assert "4 of 6 records kept, 2 skipped (line 5: invalid JSON" in err and "line 6: no assistant turn" in err
    assert _same_weights(tmp_path / "plain", tmp_path / "evaluated")
    lines = [json.loads(x) for x in (tmp_path / "evaluated" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/loss" in x]
    assert [x["step"] for x in evals] == [0, 1, 2, 3, 4] and [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    tokenizer = load_tokenizer(str(tmp_path / "base"))
    convs = [encode_chat(tokenizer, json.loads(x)["messages"]) for x in held.read_text().splitlines()[:3]]
    for step, folder in ((0, "base"), (4, "evaluated")):  # eval.at_start: step 0 is the starting model
        want, count = plain_loss_per_token(load_pretrained(tmp_path / folder), convs)
        assert evals[step]["eval/target_tokens"] == count == 9
        assert evals[step]["eval/loss"] == pytest.approx(want, rel=1e-5)
    assert evals[0]["eval/loss"] > evals[-1]["eval/loss"]


def test_sft_eval_tasks_score_the_olmes_task_in_the_loop(tmp_path, monkeypatch, capsys):
    """eval.tasks: the downstream record (pretraining's DownstreamEvaluator) at the interval and the last step,
    the last one equal to scoring the exported model directly; with no eval.data there is no eval/loss."""
    import olmo2.train.evaluation as evaluation
    from olmo2.eval.evaluate import evaluate_tasks
    from olmo2.eval.tasks import task_from_examples
    from olmo2.tokenizers import load_tokenizer
    from test_eval import examples

    toy = task_from_examples("arc_easy:rc", examples(6, seed=5), load_tokenizer("byte"), max_length=64)
    monkeypatch.setattr(evaluation, "load_task", lambda name, tokenizer, max_length, limit: toy)
    run = _resume_setup(tmp_path)
    assert run("tasks", "max_steps=3", "eval.tasks=[arc_easy:rc]", "eval.interval=2") == 0
    assert "downstream evaluation: 1 task(s) (arc_easy:rc)" in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "tasks" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/seconds" in x]
    assert [x["step"] for x in evals] == [2, 3] and not any("eval/loss" in x for x in evals)
    want = evaluate_tasks(load_pretrained(tmp_path / "tasks"), [toy], progress=False)[0].metrics
    assert evals[-1]["downstream/arc_easy:rc/primary"] == pytest.approx(want["primary"], abs=1e-9)
    assert evals[-1]["downstream/arc_easy:rc/acc_raw"] == pytest.approx(want["acc_raw"], abs=1e-9)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_resume_refuses_a_changed_precision(tmp_path, stage, monkeypatch, capsys):
    """A run stopped in bf16 (on CPU through autocast: setup_model keeps bf16 for GPUs, so the fp32 setup is
    taken and its precision set to bf16, the path a GPU takes without FSDP2) and rerun in fp32: refused in one
    line naming the key, both values and the checkpoint, exit 2; rerun in bf16 it resumes."""
    import dataclasses

    import olmo2.dpo
    import olmo2.sft
    from test_dpo import _dpo_resume_setup

    module = olmo2.sft if stage == "sft" else olmo2.dpo
    real = olmo2.sft.setup_model

    def bf16_setup(cfg, packing=False):
        par = real(dataclasses.replace(cfg, precision="fp32"), packing)
        par.precision = "bf16"
        return par

    run = _resume_setup(tmp_path) if stage == "sft" else _dpo_resume_setup(tmp_path)[0]
    with monkeypatch.context() as patch:
        patch.setattr(module, "setup_model", bf16_setup)
        assert run("out", "precision=bf16", "hard_stop=1") == 0
    capsys.readouterr()
    assert run("out", "precision=fp32", "hard_stop=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = tmp_path / "out" / "checkpoints" / "step00000001"
    assert err[-1] == (f"olmo2-{stage}: precision='fp32' (here fp32) differs from 'bf16' in checkpoint {checkpoint}: "
                       "resume needs the same value (or another checkpoint_dir)"), err
    with monkeypatch.context() as patch:
        patch.setattr(module, "setup_model", bf16_setup)
        assert run("out", "precision=bf16", "hard_stop=2") == 0
    assert "resumed from" in capsys.readouterr().err


def verified_prompts(path, monkeypatch):
    """6 prompts checked by test_even_sum (an answer whose code points sum to an even number: a random tiny
    model gets about half right; registered in a copy of the verifier registry), then a bad JSON line."""
    import olmo2.rl.verifiers as V

    even_sum = lambda text, ref: sum(map(ord, text)) % 2 == 0  # noqa: E731
    monkeypatch.setattr(V, "VERIFIERS", {**V.VERIFIERS, "test_even_sum": even_sum})
    lines = [json.dumps({"prompt": f"Add {a} and {a + 1}", "verifier": "test_even_sum", "reference": str(2 * a + 1)})
             for a in range(6)]
    path.write_text("\n".join(lines + ["{oops"]) + "\n")
    return path


def test_sft_eval_prompts_is_rls_verified_accuracy_and_leaves_training_bitwise(tmp_path, monkeypatch, capsys):
    """eval.prompts: RL's greedy and sampled verified accuracy at steps 0, 2 and 4 (stopped at 2 and resumed),
    equal to olmo2.rl.evaluation.evaluate_prompts on the base and exported models; the weights are bitwise
    those of a run without evaluation; bad prompt records reported by line; a missing file is one line."""
    from olmo2.cli.sft import main
    from olmo2.rl.data import read_prompts
    from olmo2.rl.evaluation import evaluate_prompts
    from olmo2.tokenizers import load_tokenizer

    run = _resume_setup(tmp_path)
    prompts_file = verified_prompts(tmp_path / "prompts.jsonl", monkeypatch)
    keys = [f"eval.prompts={prompts_file}", "eval.interval=2", "eval.at_start=true", "eval.max_new_tokens=6",
            "eval.samples=2", "eval.prompts_limit=5"]
    assert run("plain") == 0
    assert run("verified", *keys, "hard_stop=2") == 0
    assert run("verified", *keys) == 0
    err = capsys.readouterr().err
    assert "eval.prompts" in err and "line 7: invalid JSON" in err
    assert _same_weights(tmp_path / "plain", tmp_path / "verified")
    lines = [json.loads(x) for x in (tmp_path / "verified" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/seconds" in x]
    assert [x["step"] for x in evals] == [0, 2, 4] and not any("eval/loss" in x for x in evals)
    tokenizer = load_tokenizer(str(tmp_path / "base"))
    prompts = read_prompts(prompts_file, tokenizer, 64)[0][:5]
    for record, folder in ((evals[0], "base"), (evals[-1], "verified")):
        want = evaluate_prompts(load_pretrained(tmp_path / folder), tokenizer, prompts, 6, samples=2,
                                temperature=1.0, seed=124)  # the run's seed + 1
        assert record["eval/verified_accuracy"] == want["accuracy"]
        assert record["eval/verified_reward"] == want["reward"]
        assert record["eval/verified_sampled_accuracy"] == want["sampled_accuracy"]
    assert any(0 < x[f"eval/verified_{k}"] < 1 for x in evals for k in ("accuracy", "sampled_accuracy"))
    capsys.readouterr()
    assert run("missing", f"eval.prompts={tmp_path / 'nope.jsonl'}", "eval.interval=1") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"olmo2-sft: eval.prompts {tmp_path / 'nope.jsonl'}: no such file")


def test_dpo_eval_prompts_logs_verified_accuracy_beside_the_heldout_pairs(tmp_path, monkeypatch, capsys):
    """DPO takes the same eval.prompts: its verified keys sit beside eval/accuracy (the preference accuracy)."""
    from test_dpo import _dpo_resume_setup

    run, data = _dpo_resume_setup(tmp_path)
    prompts_file = verified_prompts(tmp_path / "prompts.jsonl", monkeypatch)
    assert run("out", "max_steps=1", f"eval.prompts={prompts_file}", f"eval.data={data}", "eval.interval=1",
               "eval.max_new_tokens=4") == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/seconds" in x]
    assert [x["step"] for x in evals] == [1]
    assert {"eval/accuracy", "eval/verified_accuracy", "eval/verified_reward"} <= set(evals[0])
    assert "eval/verified_sampled_accuracy" not in evals[0]
    assert "eval/verified_accuracy" in capsys.readouterr().err
