"""The DPO step benchmark (issue 14, item 5): fused log-probs vs materialized logits.

One step is what :func:`olmo2.dpo.train_dpo` does per micro-batch: chosen and
rejected rows in one forward, per-sequence log-probabilities of the response
tokens, the length-normalized DPO loss (Tülu 3, beta 5) against fixed reference
log-probs, and its backward. The two implementations differ only in how the
log-probabilities leave the LM head:

* ``fused``: :func:`olmo2.dpo.sequence_logps`, i.e. ``model(..., labels,
  reduction="none")`` through ``olmo2_kernels.linear_cross_entropy``, which
  never holds the (rows, tokens, vocab) logits;
* ``materialized``: ``model(input_ids).logits`` (the LM head matmul), then
  ``log_softmax`` in fp32 and a gather of the targets: the usual DPO code (TRL,
  open-instruct), holding the logits, their fp32 log-softmax and its gradient.

Both run on the same weights and tokens (so their losses agree to rounding).
Reported: the harness's median and 20/80 quantiles of the step, tokens/s, the
peak memory above what is live before the step: weights, batch and the
(allocated, zeroed) gradients, as for each micro-batch of an accumulated step
after the first (the profiler's allocation events on CPU,
``max_memory_allocated`` on GPU), and the bytes of one copy of
the logits for scale. ``--vocab-size`` changes the preset's vocabulary (the tiny
layout's 512 next to dolma2's 100352 is where the logits stop being small). Defaults: ``olmo2-tiny`` on CPU, ``olmo2-1b`` at Tülu 3's
DPO length (2048) on GPU.
"""
from __future__ import annotations

import gc
import time
import traceback

import torch

from olmo2 import Olmo2ForCausalLM
from olmo2.chat import IGNORE_INDEX
from olmo2.config import Olmo2Config
from olmo2.dpo import dpo_loss, sequence_logps

from . import harness, report
from .specs import canonical_preset

IMPL_NAMES = ("fused", "materialized")
DESCRIPTIONS = {
    "fused": "olmo2.dpo.sequence_logps: linear_cross_entropy(reduction='none'), no (rows, tokens, vocab) logits",
    "materialized": "model(input_ids).logits, fp32 log_softmax, gather of the targets",
}
BETA = 5.0  # Tülu 3's length-normalized DPO beta


def materialized_logps(model: Olmo2ForCausalLM, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: sequence log-prob sums from materialized logits (same contract as ``sequence_logps``)."""
    logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    return picked.sum(1), mask.sum(1)


LOGPS = {"fused": sequence_logps, "materialized": materialized_logps}


def _defaults(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {
        "preset": canonical_preset(args.preset or ("olmo2-1b" if gpu else "olmo2-tiny")),
        "seq_len": args.seq_len or (2048 if gpu else (64 if args.quick else 256)),
        "pairs": args.pairs or (4 if gpu else (1 if args.quick else 4)),
        "vocab_size": args.vocab_size,
        "steps": args.steps or (3 if args.quick else (10 if gpu else 10)),
    }


def make_batch(pairs: int, seq_len: int, vocab: int, device: torch.device, seed: int) -> tuple[dict, torch.Tensor]:
    """2 * pairs rows (chosen then rejected) of random tokens: the first quarter of each row is the
    prompt (labels -100), the rest the response; and fixed reference log-prob sums (pairs, 2)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    rows = 2 * pairs
    input_ids = torch.randint(0, vocab, (rows, seq_len), device=device, generator=g)
    labels = input_ids.clone()
    labels[:, : seq_len // 4] = IGNORE_INDEX
    positions = torch.arange(seq_len, device=device).expand(rows, seq_len)
    responses = seq_len - seq_len // 4
    ref = -torch.rand((pairs, 2), device=device, generator=g) - responses * torch.log(torch.tensor(float(vocab)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}, ref


def run_dpo_benchmark(args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = _defaults(args, device)
    overrides = {"attn_backend": "sdpa"}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    model_cfg = Olmo2Config.preset(cfg["preset"], **overrides)
    if cfg["seq_len"] > model_cfg.max_position_embeddings:
        model_cfg = Olmo2Config.preset(cfg["preset"], max_position_embeddings=cfg["seq_len"], **overrides)
    rows = 2 * cfg["pairs"]
    tokens = rows * cfg["seq_len"]
    logits_bytes = tokens * model_cfg.vocab_size * torch.empty((), dtype=dtype).element_size()
    doc = {
        "schema": report.SCHEMA_VERSION,
        "kind": "dpo",
        "env": report.environment(device),
        "config": {**cfg, "rows": rows, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
                   "seed": args.seed, "loss_type": "dpo_norm", "beta": BETA, "impls": list(args.impls),
                   "impl_descriptions": {n: DESCRIPTIONS[n] for n in args.impls}},
        "model_config": model_cfg.to_dict(),
        "logits_bytes": logits_bytes,
        "rows": [],
    }
    print(f"[bench] dpo step {cfg['preset']}: {cfg['pairs']} pairs ({rows} rows) x {cfg['seq_len']} tokens, {dtype} "
          f"on {report.device_name(device)}; one copy of the logits: {logits_bytes / 2**20:.1f} MiB")
    init = torch.Generator(device=device)
    init.manual_seed(args.seed)
    model = Olmo2ForCausalLM.from_config(model_cfg, device=device, dtype=dtype, generator=init)
    model.train()
    doc["num_parameters"] = model.num_parameters()
    batch, ref = make_batch(cfg["pairs"], cfg["seq_len"], model_cfg.vocab_size, device, args.seed)
    n = cfg["pairs"]
    timing = harness.TimingConfig(warmup_calls=1 if args.quick else 2, warmup_s=0.0, budget_s=0.0,
                                  min_repeats=cfg["steps"], max_repeats=cfg["steps"])

    for impl in args.impls:
        row = {"impl": impl, "description": DESCRIPTIONS[impl], "status": "ok", "reason": None}
        doc["rows"].append(row)
        logps_fn = LOGPS[impl]
        first = {}

        def prepare(_):
            # Gradients stay allocated (zeroed), as for every micro-batch after the first of an accumulated
            # step: the peak measured is then what the step adds above weights and gradients.
            model.zero_grad(set_to_none=False)

        def step(_):
            logps, counts = logps_fn(model, batch)
            losses, metrics = dpo_loss(logps[:n], logps[n:], ref[:, 0].to(logps.dtype), ref[:, 1].to(logps.dtype),
                                       counts[:n], counts[n:], BETA, "dpo_norm")
            loss = losses.mean()
            if not first:
                first["loss"] = loss.detach()
                first["logp_chosen"] = metrics["logp_chosen"].sum().detach()
            loss.backward()

        start = time.perf_counter()
        try:
            t = harness.time_calls(step, [None], device, timing, prepare=prepare)
            row["step"] = t.as_dict()
            row["tokens_per_s"] = tokens / (t.median_ms * 1e-3)
            row["loss"] = float(first["loss"])
            row["logp_chosen_sum"] = float(first["logp_chosen"])
            prepare(None)
            gc.collect()
            extra, why = harness.peak_memory(lambda: step(None), device)
            row["peak_mem_bytes"] = extra  # above the weights, batch and gradients live before the step
            row["peak_over_logits"] = None if extra is None else extra / logits_bytes
            if why:
                row["peak_mem_note"] = why
        except Exception as exc:  # noqa: BLE001
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            row.update(status="skipped" if oom else "error",
                       reason=("out of memory (try --pairs or --seq-len)" if oom
                               else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
            if not oom:
                row["traceback"] = traceback.format_exc(limit=8)
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - start
        if row["status"] == "ok":
            mem = "n/a" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.1f} MiB"
            print(f"[bench] {impl}: median {t.median_ms:.2f} ms ({t.q20_ms:.2f}-{t.q80_ms:.2f}), peak {mem}")
        else:
            print(f"[bench] {impl}: {row['status']}: {row['reason']}")
    return doc


def format_dpo_table(doc: dict) -> str:
    env, cfg = doc["env"], doc["config"]
    head = (f"device: {env['device']} | torch {env['torch']} | commit {(env['git'].get('commit') or 'unknown')[:12]}"
            f" | {env['date']}\nDPO step (dpo_norm, forward+backward of chosen and rejected) {cfg['preset']}: "
            f"{cfg['pairs']} pairs = {cfg['rows']} rows x {cfg['seq_len']} tokens, vocab "
            f"{doc['model_config']['vocab_size']}, {cfg['dtype']}; "
            f"logits would be {doc['logits_bytes'] / 2**20:.1f} MiB")
    header = ["impl", "step ms median (q20-q80)", "tokens/s", "peak MiB", "peak / logits", "loss"]
    lines = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            lines.append([r["impl"], f"{r['status']}: {r['reason']}", "-", "-", "-", "-"])
            continue
        t = r["step"]
        peak = r.get("peak_mem_bytes")
        lines.append([r["impl"], f"{t['median_ms']:.2f} ({t['q20_ms']:.2f}-{t['q80_ms']:.2f})",
                      f"{r['tokens_per_s']:.0f}", "-" if peak is None else f"{peak / 2**20:.1f}",
                      "-" if peak is None else f"{r['peak_over_logits']:.2f}", f"{r['loss']:.6f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return head + "\n\n" + "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])
