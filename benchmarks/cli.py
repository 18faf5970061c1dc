"""``olmo2-bench``: benchmark the kernels and the model against eager PyTorch,
torch.compile and Liger-Kernel.

    olmo2-bench [kernels] [--quick] [--ops rms_norm,swiglu] [--backends torch,triton,compile]
                          [--dtype bf16] [--presets 1b,7b] [--out bench_out] [--name kernels]
    olmo2-bench model [--preset 1b] [--seq-len 4096] [--batch-size 4] [--impls kernels,eager,compile,transformers]
    olmo2-bench dpo [--preset 1b] [--pairs 4] [--seq-len 2048] [--impls fused,materialized]
    olmo2-bench generate [--preset 1b] [--batch-sizes 1,8,32] [--k 4] [--prompt-len 64] [--new-tokens 64]
    olmo2-bench report FILE.json [FILE.json ...] [--out DIR]     # print tables and redraw plots

``kernels`` is the default subcommand. Results go to ``--out`` (default
``bench_out/``): ``<name>.json`` with the device, versions, commit and date,
and PNG plots when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import harness, kernels, plots, report
from .impls import IMPLS
from .dpo_step import IMPL_NAMES as DPO_IMPLS, format_dpo_table, run_dpo_benchmark
from .generate import IMPL_NAMES as GENERATE_IMPLS, format_generate_table, run_generate_benchmark
from .model import ATTN_CHOICES, IMPL_NAMES, run_model_benchmark
from .specs import CPU_PRESET, GPU_PRESETS, OPS, canonical_preset, plan


class UsageError(Exception):
    """Bad arguments found after parsing: one line on stderr, exit 2 (as argparse's own errors)."""


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
SUBCOMMANDS = ("kernels", "model", "dpo", "generate", "report")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _choices(name: str, allowed):
    def parse(value: str) -> list[str]:
        items = _csv(value)
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated subset of {', '.join(allowed)}; got {value!r}")
        return items

    return parse


def _device(value: str | None) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(value)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("olmo2-bench: --device cuda, but no CUDA device is available")
    return dev


def _dtype(args, device: torch.device) -> torch.dtype:
    """``--dtype``, else bf16 on GPU and fp32 on CPU (where bf16 matmuls have no fast path)."""
    return DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes, short timing: a smoke run for CI")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="results folder (default: bench_out/)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input dtype (default: bf16 on GPU, fp32 on CPU, where bf16 matmuls have no fast path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's). On a shared machine, 1 avoids timing other "
                        "processes' contention")
    p.add_argument("--no-plots", action="store_true", help="write JSON only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmo2-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    k = sub.add_parser("kernels", help="every op x backend/baseline x shape (default)")
    _add_common(k)
    k.add_argument("--ops", type=_choices("--ops", OPS), default=list(OPS),
                   help=f"comma-separated ops among {', '.join(OPS)} (default: all)")
    k.add_argument("--backends", type=_choices("--backends", tuple(IMPLS)), default=list(IMPLS),
                   help=f"implementations to run, among {', '.join(IMPLS)} (default: all; 'torch' is the speedup baseline)")
    k.add_argument("--presets", type=_csv, default=list(GPU_PRESETS),
                   help="model presets (olmo2.config.PRESETS, '1b' = 'olmo2-1b') whose training shapes run on GPU "
                        f"(default: {','.join(GPU_PRESETS)}; CPU runs use {CPU_PRESET})")
    k.add_argument("--tokens", type=int, default=None,
                   help="tokens (rows) of every case instead of the presets' counts: one shape per op and preset "
                        "(a time-bounded run)")
    k.add_argument("--name", default="kernels", help="results file stem: <out>/<name>.json")
    k.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    k.add_argument("--dry-run", action="store_true", help="print the plan and why anything is skipped; run nothing")

    m = sub.add_parser("model", help="forward+backward steps of an OLMo 2 model: our kernels vs eager, compile, transformers")
    _add_common(m)
    m.add_argument("--preset", default=None, help="model preset (default: 1b on GPU, tiny on CPU)")
    m.add_argument("--seq-len", type=int, default=None, help="default: 4096 on GPU, 128 on CPU")
    m.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 4 on GPU, 2 on CPU)")
    m.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on GPU, 5 on CPU, 3 --quick)")
    m.add_argument("--impls", type=_choices("--impls", IMPL_NAMES), default=list(IMPL_NAMES))
    m.add_argument("--attn-backend", choices=ATTN_CHOICES, default="sdpa",
                   help="attention of every implementation: sdpa (torch picks the kernel), sdpa-flash (SDPA's "
                        "FlashAttention kernel only), flash_attn (the flash-attn package), eager (default: sdpa)")
    m.add_argument("--name", default="model")

    d = sub.add_parser("dpo", help="a DPO step (chosen + rejected, forward+backward): fused log-probs vs "
                                   "materialized logits, time and peak memory")
    _add_common(d)
    d.add_argument("--preset", default=None, help="model preset (default: 1b on GPU, tiny on CPU)")
    d.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 2048 on GPU, 256 on CPU)")
    d.add_argument("--pairs", type=int, default=None, help="preference pairs per step, 2 rows each (default: 4)")
    d.add_argument("--steps", type=int, default=None, help="timed steps (default: 10, 3 --quick)")
    d.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary instead of the preset's (e.g. 100352, dolma2's, on the tiny layout)")
    d.add_argument("--impls", type=_choices("--impls", DPO_IMPLS), default=list(DPO_IMPLS))
    d.add_argument("--name", default="dpo")

    g = sub.add_parser("generate", help="RL-style sampling (k completions per prompt, KV cache): tokens/s of "
                                        "olmo2.generation.sample against generate()")
    _add_common(g)
    g.add_argument("--preset", default=None, help="model preset (default: 1b on GPU, tiny on CPU)")
    g.add_argument("--batch-sizes", type=lambda v: [int(x) for x in _csv(v)], default=None,
                   help="rows (prompts x k) per call, comma-separated (default: 1,8,32 on CPU, 1,8,32,128 on GPU)")
    g.add_argument("--k", type=int, default=4, help="samples per prompt (fewer when a batch is smaller; default 4)")
    g.add_argument("--prompt-len", type=int, default=None,
                   help="longest prompt; lengths are uniform in [half, all] (default: 64 on CPU, 512 on GPU)")
    g.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default: 64 on CPU, 512 on GPU)")
    g.add_argument("--steps", type=int, default=None, help="timed calls per case (default: 5, 3 --quick)")
    g.add_argument("--impls", type=_choices("--impls", GENERATE_IMPLS), default=list(GENERATE_IMPLS))
    g.add_argument("--name", default="generate")

    r = sub.add_parser("report", help="print the tables of result files and redraw their plots")
    r.add_argument("files", nargs="+", type=Path)
    r.add_argument("--out", type=Path, default=None, help="plots folder (default: beside each file)")
    r.add_argument("--no-plots", action="store_true")
    return parser


def _timing_config(device: torch.device, quick: bool, budget: float | None) -> harness.TimingConfig:
    if quick:
        cfg = harness.TimingConfig(warmup_calls=2, warmup_s=0.0, budget_s=0.05, min_repeats=5, max_repeats=50)
    elif device.type == "cuda":
        cfg = harness.TimingConfig(warmup_calls=3, warmup_s=0.1, budget_s=0.5, min_repeats=5, max_repeats=500)
    else:
        cfg = harness.TimingConfig(warmup_calls=2, warmup_s=0.05, budget_s=0.3, min_repeats=5, max_repeats=100)
    if budget is not None:
        cfg.budget_s = budget
    return cfg


def _plots(doc: dict, out: Path, enabled: bool, name: str = "model") -> None:
    if not enabled:
        return
    written, why = plots.plot(doc, out, name)
    if why:
        print(f"[bench] plots skipped: {why}")
    for path in written:
        print(f"[bench] wrote {path}")


def _apply_threads(args) -> None:
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"olmo2-bench: --threads must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)


def cmd_kernels(args) -> int:
    device = _device(args.device)
    _apply_threads(args)
    dtype = _dtype(args, device)
    try:
        cases = plan(device.type, ops=args.ops, presets=args.presets, quick=args.quick, tokens=args.tokens)
    except ValueError as exc:
        raise UsageError(f"olmo2-bench: {exc}") from None
    impl_names = list(args.backends)
    if args.dry_run:
        for case in cases:
            print(case.key)
            for name in impl_names:
                reason = IMPLS[name].unavailable(case.op, device, dtype, args.quick)
                print(f"  {name:8s} {'runs' if reason is None else 'skipped: ' + reason}")
        return 0

    timing = _timing_config(device, args.quick, args.budget)
    start = time.perf_counter()
    print(f"[bench] device {report.device_name(device)}, dtype {dtype}, {len(cases)} cases, "
          f"implementations {', '.join(impl_names)}")
    ceilings = harness.measure_ceilings(device, dtype)
    print(f"[bench] ceilings: copy {ceilings['copy_GBps']:.1f} GB/s, "
          f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_TFLOPs']:.3g} TFLOP/s")
    doc = {
        "schema": report.SCHEMA_VERSION,
        "kind": "kernels",
        "env": report.environment(device),
        "config": {
            "dtype": str(dtype).replace("torch.", ""),
            "quick": args.quick,
            "ops": list(args.ops),
            "backends": impl_names,
            "presets": [canonical_preset(p) for p in args.presets] if device.type == "cuda" else [CPU_PRESET],
            "tokens": args.tokens,
            "seed": args.seed,
            "timing": vars(timing),
            "impl_descriptions": {n: IMPLS[n].description for n in impl_names},
        },
        "ceilings": ceilings,
        "rows": [],
    }
    path = args.out / f"{args.name}.json"
    for rows in kernels.run(cases, impl_names, device, dtype, quick=args.quick, seed=args.seed, timing=timing,
                    ceilings=ceilings):
        doc["rows"].extend(rows)
        lines, _ = report.kernel_lines(rows)
        for line in lines:
            print("   ", "  ".join(line))
        report.write_json(path, doc)  # after every case: a killed run keeps what it measured
    doc["wall_s"] = time.perf_counter() - start
    report.write_json(path, doc)
    print()
    print(report.format_kernel_table(doc))
    print(f"\n[bench] wrote {path} ({doc['wall_s']:.0f} s)")
    _plots(doc, args.out, not args.no_plots)
    return 1 if any(r["status"] == "error" for r in doc["rows"]) else 0


def cmd_model(args) -> int:
    device = _device(args.device)
    _apply_threads(args)
    doc = run_model_benchmark(args, device, _dtype(args, device))
    path = args.out / f"{args.name}.json"
    report.write_json(path, doc)
    print()
    print(report.format_model_table(doc))
    print(f"\n[bench] wrote {path}")
    _plots(doc, args.out, not args.no_plots, args.name)
    return 1 if any(r["status"] == "error" for r in doc["rows"]) else 0


def cmd_dpo(args) -> int:
    device = _device(args.device)
    _apply_threads(args)
    doc = run_dpo_benchmark(args, device, _dtype(args, device))
    path = args.out / f"{args.name}.json"
    report.write_json(path, doc)
    print()
    print(format_dpo_table(doc))
    print(f"\n[bench] wrote {path}")
    return 1 if any(r["status"] == "error" for r in doc["rows"]) else 0


def cmd_generate(args) -> int:
    device = _device(args.device)
    _apply_threads(args)
    for name in ("k", "prompt_len", "new_tokens", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"olmo2-bench generate: --{name.replace('_', '-')} must be a positive int, got {value}")
    if args.batch_sizes is not None and (not args.batch_sizes or min(args.batch_sizes) < 1):
        raise UsageError(f"olmo2-bench generate: --batch-sizes must be positive ints, got {args.batch_sizes}")
    try:
        doc = run_generate_benchmark(args, device, _dtype(args, device))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    path = args.out / f"{args.name}.json"
    report.write_json(path, doc)
    print()
    print(format_generate_table(doc))
    print(f"\n[bench] wrote {path}")
    return 1 if any(r["status"] == "error" for r in doc["rows"]) else 0


def _report_error(what: str, file) -> int:
    """A file ``report`` cannot read: one line, ``olmo2-bench report: <what> (<path>)``, exit 2."""
    print(f"olmo2-bench report: {what} ({file})", file=sys.stderr, flush=True)
    return 2


def cmd_report(args) -> int:
    for file in args.files:
        try:
            doc = report.read_json(file)
            formats = {"kernels": report.format_kernel_table, "dpo": format_dpo_table, "generate": format_generate_table}
            table = formats.get(doc["kind"], report.format_model_table)(doc)
        except FileNotFoundError:
            return _report_error("no such file", file)
        except IsADirectoryError:
            return _report_error("a folder, not a result file", file)
        except OSError as exc:
            return _report_error(f"cannot be read: {exc.strerror or exc}", file)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            return _report_error(f"not an olmo2-bench result file: {detail}", file)
        print(f"== {file}")
        print(table)
        print()
        if doc["kind"] not in ("dpo", "generate"):  # tables only; no plot
            _plots(doc, args.out or Path(file).parent, not args.no_plots, Path(file).stem)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "kernels")
    args = build_parser().parse_args(argv)
    handler = {"kernels": cmd_kernels, "model": cmd_model, "dpo": cmd_dpo, "generate": cmd_generate,
               "report": cmd_report}[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
