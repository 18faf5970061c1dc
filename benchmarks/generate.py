"""The generation benchmark (issue 15, item 2): tokens/s of RL-style sampling.

One call is what an RL rollout asks of the policy: ``rows`` completions of
``new_tokens`` tokens each, ``k`` per prompt, prompts of different lengths
(uniform in [prompt_len / 2, prompt_len], left-padded in one batch), sampled at
temperature 1 with the KV cache. Eos is off, so every row generates exactly
``new_tokens`` tokens and tokens/s is ``rows * new_tokens`` over the call's
time. Two implementations on the same weights and prompts:

* ``sample``: :func:`olmo2.generation.sample`, which prefills each distinct
  prompt once, copies its keys/values to its k rows, and returns the sampled
  tokens' log-probs (an fp32 ``log_softmax`` per step);
* ``generate``: :func:`olmo2.generation.generate` on the prompts repeated k
  times (each row prefilled on its own, no log-probs): the plain KV-cache loop.

Reported per batch size: the call's median with 20/80 quantiles (the shared
harness: warm-up, then ``--steps`` timed calls), tokens/s, and the prefill alone
(the same call with one new token) so that the decode rate ``rows * (new_tokens
- 1) / (call - prefill)`` is shown apart. Defaults: ``olmo2-tiny`` in fp32 on
CPU, ``olmo2-1b`` in bf16 on GPU (the GPU path is the same code; no CUDA graphs
or ``torch.compile`` yet).
"""
from __future__ import annotations

import gc
import time
import traceback

import torch

from olmo2 import Olmo2ForCausalLM
from olmo2.config import Olmo2Config
from olmo2.generation import generate, sample

from . import harness, report
from .specs import canonical_preset

IMPL_NAMES = ("sample", "generate")
DESCRIPTIONS = {
    "sample": "olmo2.generation.sample: one prefill per prompt shared by its k rows, log-probs returned",
    "generate": "olmo2.generation.generate on the prompts repeated k times: no sharing, no log-probs",
}


def _defaults(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {
        "preset": canonical_preset(args.preset or ("olmo2-1b" if gpu else "olmo2-tiny")),
        "batch_sizes": args.batch_sizes or ([8] if args.quick else ([1, 8, 32, 128] if gpu else [1, 8, 32])),
        "k": args.k,
        "prompt_len": args.prompt_len or (16 if args.quick else (512 if gpu else 64)),
        "new_tokens": args.new_tokens or (8 if args.quick else (512 if gpu else 64)),
        "steps": args.steps or (3 if args.quick else 5),
    }


def make_prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of random ids, lengths uniform in [prompt_len // 2, prompt_len] (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    low = max(1, prompt_len // 2)
    lengths = torch.randint(low, prompt_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (m,), generator=g).tolist() for m in lengths]


def _split(rows: int, k: int) -> tuple[int, int]:
    """(prompts, k) for a batch of ``rows``: k samples per prompt, fewer when the batch is smaller."""
    k = min(k, rows)
    if rows % k:
        raise ValueError(f"olmo2-bench generate: batch size {rows} is not a multiple of --k {k}")
    return rows // k, k


def _calls(impl: str, model, prompts: list[list[int]], k: int, device: torch.device, seed: int):
    """The timed call of ``impl`` for ``n`` new tokens."""
    if impl == "sample":
        def call(n: int):
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            return sample(model, prompts, k=k, max_new_tokens=n, temperature=1.0, eos_token_id=[], generator=g)
        return call
    rows = [p for p in prompts for _ in range(k)]
    width = max(len(p) for p in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=device)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1

    def call(n: int):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return generate(model, ids, n, temperature=1.0, eos_token_id=[], attention_mask=mask, generator=g)
    return call


def run_generate_benchmark(args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = _defaults(args, device)
    splits = {rows: _split(rows, cfg["k"]) for rows in cfg["batch_sizes"]}
    model_cfg = Olmo2Config.preset(cfg["preset"], attn_backend="sdpa")
    need = cfg["prompt_len"] + cfg["new_tokens"]
    if need > model_cfg.max_position_embeddings:
        model_cfg = Olmo2Config.preset(cfg["preset"], attn_backend="sdpa", max_position_embeddings=need)
    doc = {
        "schema": report.SCHEMA_VERSION,
        "kind": "generate",
        "env": report.environment(device),
        "config": {**cfg, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick, "seed": args.seed,
                   "temperature": 1.0, "eos": "off: every row generates new_tokens", "impls": list(args.impls),
                   "impl_descriptions": {n: DESCRIPTIONS[n] for n in args.impls},
                   "threads": torch.get_num_threads() if device.type == "cpu" else None},
        "model_config": model_cfg.to_dict(),
        "rows": [],
    }
    print(f"[bench] generate {cfg['preset']} {dtype} on {report.device_name(device)}: batch sizes "
          f"{cfg['batch_sizes']} rows, k {cfg['k']}, prompts of {max(1, cfg['prompt_len'] // 2)}-{cfg['prompt_len']} "
          f"tokens, {cfg['new_tokens']} new tokens")
    init = torch.Generator(device=device)
    init.manual_seed(args.seed)
    model = Olmo2ForCausalLM.from_config(model_cfg, device=device, dtype=dtype, generator=init).eval()
    doc["num_parameters"] = model.num_parameters()
    timing = harness.TimingConfig(warmup_calls=1, warmup_s=0.0, budget_s=0.0,
                                  min_repeats=cfg["steps"], max_repeats=cfg["steps"])
    for rows, (n_prompts, k) in splits.items():
        prompts = make_prompts(n_prompts, cfg["prompt_len"], model_cfg.vocab_size, args.seed + rows)
        for impl in args.impls:
            row = {"impl": impl, "batch": rows, "prompts": n_prompts, "k": k, "status": "ok", "reason": None,
                   "prompt_tokens": sum(len(p) for p in prompts) * k}
            doc["rows"].append(row)
            start = time.perf_counter()
            try:
                call = _calls(impl, model, prompts, k, device, args.seed)
                full = harness.time_calls(lambda _: call(cfg["new_tokens"]), [None], device, timing)
                prefill = harness.time_calls(lambda _: call(1), [None], device, timing)
                decode_ms = full.median_ms - prefill.median_ms
                row.update(call=full.as_dict(), prefill=prefill.as_dict(),
                           tokens_per_s=rows * cfg["new_tokens"] / (full.median_ms * 1e-3),
                           decode_tokens_per_s=(rows * (cfg["new_tokens"] - 1) / (decode_ms * 1e-3)
                                                if decode_ms > 0 and cfg["new_tokens"] > 1 else None))
            except Exception as exc:  # noqa: BLE001
                oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
                row.update(status="skipped" if oom else "error",
                           reason=("out of memory (try smaller --batch-sizes or --new-tokens)" if oom
                                   else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
                if not oom:
                    row["traceback"] = traceback.format_exc(limit=8)
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row["wall_s"] = time.perf_counter() - start
            if row["status"] == "ok":
                print(f"[bench] batch {rows} ({n_prompts} x k={k}) {impl}: {row['tokens_per_s']:.0f} tokens/s "
                      f"(call {full.median_ms:.1f} ms, prefill {prefill.median_ms:.1f} ms)")
            else:
                print(f"[bench] batch {rows} {impl}: {row['status']}: {row['reason']}")
    return doc


def format_generate_table(doc: dict) -> str:
    env, cfg = doc["env"], doc["config"]
    head = (f"device: {env['device']} | torch {env['torch']} | commit {(env['git'].get('commit') or 'unknown')[:12]}"
            f" | {env['date']}\ngeneration {cfg['preset']} ({doc['num_parameters'] / 1e6:.1f}M parameters), "
            f"{cfg['dtype']}, k {cfg['k']} samples per prompt, prompts of {max(1, cfg['prompt_len'] // 2)}-"
            f"{cfg['prompt_len']} tokens, {cfg['new_tokens']} new tokens per row, temperature 1, eos off"
            + (f", {cfg['threads']} thread(s)" if cfg.get("threads") else ""))
    header = ["batch (prompts x k)", "impl", "call ms median (q20-q80)", "tokens/s", "prefill ms", "decode tokens/s"]
    lines = []
    for r in doc["rows"]:
        label = f"{r['batch']} ({r['prompts']} x {r['k']})"
        if r["status"] != "ok":
            lines.append([label, r["impl"], f"{r['status']}: {r['reason']}", "-", "-", "-"])
            continue
        t, p = r["call"], r["prefill"]
        dec = r.get("decode_tokens_per_s")
        lines.append([label, r["impl"], f"{t['median_ms']:.1f} ({t['q20_ms']:.1f}-{t['q80_ms']:.1f})",
                      f"{r['tokens_per_s']:.0f}", f"{p['median_ms']:.1f}", "-" if dec is None else f"{dec:.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return head + "\n\n" + "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])
