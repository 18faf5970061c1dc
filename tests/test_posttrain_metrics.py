"""SFT, DPO and RL log through pretraining's metrics sink (olmo2.train.metrics.MetricsLogger): metrics.jsonl,
TensorBoard when installed (a stand-in SummaryWriter here: tensorboard is an optional dependency), and a tqdm
bar with progress=true, under the same switches as olmo2-train (progress, tensorboard)."""
import json
import sys
import types

import pytest

from olmo2.checkpoint_hf import save_pretrained
from olmo2.tokenizers import save_tokenizer
from test_sft import tiny


class FakeWriter:
    """Records what MetricsLogger writes to TensorBoard."""
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeWriter.made = []
    return FakeWriter


def stage_run(tmp_path, stage, monkeypatch):
    """A 2-step run of ``stage`` on a tiny model (the byte tokenizer); returns run(out, *extra)."""
    import importlib

    base = tmp_path / "base"
    save_pretrained(tiny(vocab=258), base)
    save_tokenizer("byte", base)
    data = tmp_path / "data.jsonl"
    user = lambda a: [{"role": "user", "content": f"Add {a} and {a + 1}"}]  # noqa: E731
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if stage == "sft":
        records = [{"messages": user(a) + answer(str(2 * a + 1))} for a in range(4)]
        keys = ["max_length=64", "grad_accum=2", "max_steps=2", "lr=1e-2"]
    elif stage == "dpo":
        records = [{"prompt": user(a), "chosen": answer(str(2 * a + 1)), "rejected": answer(f"{2 * a} or so")}
                   for a in range(4)]
        keys = ["max_length=64", "grad_accum=2", "max_steps=2", "lr=5e-3", "beta=1.0"]
    else:
        import olmo2.rl.verifiers as V

        monkeypatch.setattr(V, "VERIFIERS", {**V.VERIFIERS, "test_even_sum":
                                             lambda text, ref: sum(map(ord, text)) % 2 == 0})
        records = [{"prompt": f"Add {a} and {a + 1}", "verifier": "test_even_sum", "reference": str(2 * a + 1)}
                   for a in range(4)]
        keys = ["steps=2", "prompts_per_step=1", "k=2", "max_new_tokens=3", "max_prompt_length=64", "beta=0",
                "lr=1e-3"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    main = importlib.import_module(f"olmo2.cli.{stage}").main

    def run(out, *extra):
        return main(["--model", str(base), "--data", str(data), "--output", str(tmp_path / out), "device=cpu",
                     "save_interval=0", *keys, *extra])

    return run


@pytest.mark.parametrize("stage", ["sft", "dpo", "rl"])
def test_every_stage_logs_through_the_one_sink(tmp_path, stage, monkeypatch, fake_tensorboard, capsys):
    """TensorBoard (on by default, as olmo2-train) gets every number of metrics.jsonl at its step, from
    OUTPUT/tensorboard; tensorboard=false writes none; progress=true draws the bar in place of the
    per-step lines and leaves metrics.jsonl's layout as it is."""
    run = stage_run(tmp_path, stage, monkeypatch)
    assert run("default") == 0
    err = capsys.readouterr().err
    assert f"olmo2-{stage}: step 1/2 " in err and "100%|" not in err  # no bar
    (writer,) = fake_tensorboard.made
    assert writer.log_dir == str(tmp_path / "default" / "tensorboard") and writer.closed
    lines = [json.loads(x) for x in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    want = sorted((k, v, x["step"]) for x in lines for k, v in x.items()
                  if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool))
    assert sorted(writer.scalars) == want and any(k == "loss" for k, _, _ in want)
    if stage != "rl":
        assert "step_time_s" in lines[0] and "step_seconds" not in lines[0]  # pretraining's name

    fake_tensorboard.made = []
    assert run("quiet", "tensorboard=false", "progress=true") == 0
    err = capsys.readouterr().err
    assert fake_tensorboard.made == [] and not (tmp_path / "quiet" / "tensorboard").exists()
    assert "100%|" in err and " 2/2 " in err and f"olmo2-{stage}: step 1/2 " not in err and f"wrote {tmp_path / 'quiet'}" in err
    quiet = [json.loads(x) for x in (tmp_path / "quiet" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(x) for x in quiet] == [sorted(x) for x in lines]
