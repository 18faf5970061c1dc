"""Our downstream scores against ``olmo_eval``'s own (the ``eval`` extra, ai2-olmo-eval 0.9.0).

For the same model and task: ``olmo_eval.build_task`` makes its requests and
``olmo_eval.ICLMetric`` computes acc / len_norm / bpb / ce_loss from the full
(B, T, V) logits of our model; ``olmo2.eval`` reads the same request files
itself, scores them on ``linear_cross_entropy`` without the logits, and must
give the same requests and the same metrics.
"""
from __future__ import annotations

import pytest
import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM
from olmo2.eval import evaluate_tasks, load_task
from olmo2.eval.tasks import olmo_eval_tokenizer
from olmo2.tokenizers import load_tokenizer

try:
    import olmo_eval  # noqa: F401
    from olmo_eval import ICLMetric, build_task

    MISSING = None
except Exception as exc:  # noqa: BLE001 - any import failure means: no reference to compare with
    MISSING = f"olmo_eval (the eval extra, ai2-olmo-eval==0.9.0) is not importable: {type(exc).__name__}: {exc}"

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

DOCS = 20
CTX = 128  # the olmo2-test preset's context: 5-shot prompts are cut from the left


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test")).eval()


@pytest.fixture(scope="module")
def byte_tokenizer():
    return load_tokenizer("byte")


def olmo_eval_metrics(model, tokenizer, label: str, doc_ids: set[int], metric_type: str | None = None):
    """olmo_eval's requests and ICLMetric on the full logits of ``model``."""
    dataset = build_task(label, olmo_eval_tokenizer(tokenizer), model_ctx_len=CTX)
    samples = [s for s in dataset.samples if s["doc_id"] in doc_ids]
    metric = ICLMetric(metric_type=metric_type or dataset.metric_type)
    with torch.no_grad():
        for start in range(0, len(samples), 16):
            batch = dataset.collate_fn(samples[start:start + 16])
            logits = model(batch["input_ids"][:, :CTX]).logits.float()
            metric.update(batch, logits)
    return samples, {k: float(v) for k, v in metric.compute().items()}


@pytest.mark.parametrize("name,label,ours", [
    ("arc_easy:rc", "arc_easy_rc_5shot", {"acc_v2": "acc_raw", "ce_loss_v2": "ce_loss", "bpb_v2": "bpb"}),
    ("arc_challenge:rc", "arc_challenge_rc_5shot", {"len_norm_v2": "acc_per_char", "bpb_v2": "bpb"}),
    ("arc_easy:bpb", "arc_easy_rc_5shot_bpb", {"bpb_v2": "bpb"}),
])
def test_metrics_equal_olmo_eval_icl_metric(model, byte_tokenizer, name, label, ours):
    task = load_task(name, byte_tokenizer, max_length=CTX, limit=DOCS)
    assert len(task.docs) == DOCS
    samples, reference = olmo_eval_metrics(model, byte_tokenizer, label, {d.doc_id for d in task.docs})

    # The same requests: query tokens, where the continuation starts, its tokens and lengths.
    conditional = [r for r in task.requests if not r.unconditional]
    assert len(conditional) == len(samples)
    ref = {(s["doc_id"], s["cont_id"]): s for s in samples}
    for r in conditional:
        s = ref[(task.docs[r.doc].doc_id, r.choice)]
        assert list(r.query) == s["query"] and r.ctx_len == s["ctx_len"]
        assert list(r.continuation) == s["continuation"]
        assert (r.chars, r.bytes) == (s["cont_str_len"], s["cont_byte_len"])

    result = evaluate_tasks(model, [task], batch_tokens=2048, progress=False)[0]
    for theirs, mine in ours.items():
        if mine.startswith("acc"):  # the same count of correct documents (theirs is a float32)
            assert round(result.metrics[mine] * DOCS) == round(reference[theirs] * DOCS), (mine, result.metrics,
                                                                                          reference)
        else:
            assert result.metrics[mine] == pytest.approx(reference[theirs], rel=1e-5), (mine, result.metrics, reference)


def test_dolma2_requests_equal_olmo_eval(byte_tokenizer):
    """With OLMo 2's own tokenizer the requests are token for token olmo_eval's."""
    tokenizer = load_tokenizer("dolma2")
    task = load_task("piqa:rc", tokenizer, max_length=CTX, limit=5)
    dataset = build_task("piqa_rc_5shot", olmo_eval_tokenizer(tokenizer), model_ctx_len=CTX)
    ref = {(s["doc_id"], s["cont_id"]): s for s in dataset.samples}
    conditional = [r for r in task.requests if not r.unconditional]
    assert len(conditional) == 10
    for r in conditional:
        s = ref[(task.docs[r.doc].doc_id, r.choice)]
        assert (list(r.query), r.ctx_len, list(r.continuation)) == (s["query"], s["ctx_len"], s["continuation"])


def test_mmlu_through_olmo_eval(model, byte_tokenizer):
    task = load_task("mmlu_stem:mc", byte_tokenizer, max_length=CTX, limit=5)
    assert len(task.docs) == 5 and all(d.num_choices == 4 for d in task.docs)
    assert {r.continuation for r in task.requests} == {tuple(byte_tokenizer.encode(f" {c}").ids) for c in "ABCD"}
    result = evaluate_tasks(model, [task], progress=False)[0]
    assert 0.0 <= result.metrics["acc_raw"] <= 1.0



def test_olmo2_eval_command(tmp_path, model, capsys):
    """olmo2-eval on an HF folder: the table, the JSON, the checkpoint's own tokenizer. And a
    document whose continuation is longer than the context is left out and counted."""
    import json

    from olmo2 import save_pretrained
    from olmo2.cli.eval import main
    from olmo2.tokenizers import save_tokenizer

    save_pretrained(model, tmp_path / "hf")
    save_tokenizer("byte", tmp_path / "hf")
    out = tmp_path / "eval.json"
    assert main(["--model", str(tmp_path / "hf"), "--tasks", "arc_easy:rc,boolq:bpb", "--limit", "3",
                 "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "arc_easy:rc" in captured.out and "boolq:bpb" in captured.out and "acc_uncond" in captured.out
    assert "tokenizer.json" in captured.err  # the checkpoint's own tokenizer, not dolma2
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"arc_easy:rc", "boolq:bpb"} and report["limit"] == 3
    assert report["tasks"]["arc_easy:rc"]["num_docs"] == 3 and report["versions"]["ai2-olmo-eval"] == "0.9.0"
    assert report["tasks"]["boolq:bpb"]["primary_metric"] == "bpb"
    assert "commit" in report and report["max_length"] == 128

    task = load_task("gsm8k:bpb", load_tokenizer("byte"), max_length=CTX, limit=4)
    assert task.skipped_docs > 0 and len(task.docs) == 4 - task.skipped_docs
