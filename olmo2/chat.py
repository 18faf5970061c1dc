"""The Tülu 3 / OLMo 2 Instruct chat format: one renderer, chat and preference JSONL.

What this module owns:

* :data:`CHAT_TEMPLATE`, the Jinja template that goes into an exported
  ``tokenizer_config.json`` (``save_pretrained(..., chat_template=...)``), and
  :func:`render`, the same format in Python. Training, ``olmo2-generate --chat``
  and the export all go through :func:`render` / :data:`CHAT_TEMPLATE`; a test
  checks that ``transformers``' ``apply_chat_template`` on the exported
  tokenizer gives exactly the ids of :func:`encode_chat`.
* :func:`encode_chat`: ids and labels (``-100`` everywhere except the assistant
  turns, each of which ends with EOS).
* :func:`read_chat_jsonl` / :func:`read_preference_jsonl`: records in the
  ``{"messages": [...]}`` and ``{"prompt", "chosen", "rejected"}`` formats. Bad
  records are collected with their line numbers (:class:`BadRecords`), never
  silently dropped and never raised mid-run; callers print :meth:`BadRecords.summary`.

Source of the template: the ``chat_template`` of OLMo 2 Instruct's published
``tokenizer_config.json`` (``allenai/OLMo-2-1124-13B-Instruct``, the 2025-01
re-release), which is the ``"tulu"`` template of allenai/open-instruct with
``{{ bos_token }}`` in front, the bos token being ``<|endoftext|>`` (id 100257),
the pad token ``<|pad|>`` (100277). :data:`CHAT_TEMPLATE` was compared with that
file's string after JSON decoding: identical, character for character.
``<|system|>\n``, ``<|user|>\n`` and ``<|assistant|>\n`` headers, each turn
followed by ``\n``, an assistant turn ending with EOS (then ``\n`` unless it is
the last message), and ``<|assistant|>\n`` as the generation prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


def render(
    messages: list[dict], add_generation_prompt: bool = False, bos: str = BOS_TOKEN, eos: str = EOS_TOKEN
) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``messages`` in :data:`CHAT_TEMPLATE`, and the (start, end)
    character spans that are trained on: each assistant turn's content and its EOS."""
    parts, spans, pos = [bos], [], len(bos)
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        last = i == len(messages) - 1
        if role == "assistant":
            header = "<|assistant|>\n"
            start = pos + len(header)
            text = header + content + eos
            spans.append((start, pos + len(text)))
            if not last:
                text += "\n"
        elif role in ("system", "user"):
            text = f"<|{role}|>\n" + content + "\n"
        else:
            text = ""
        parts.append(text)
        pos += len(text)
        if last and add_generation_prompt:
            parts.append("<|assistant|>\n")
            pos += len("<|assistant|>\n")
    return "".join(parts), spans


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``messages``: the whole rendered text is
    tokenized once (so ids equal ``apply_chat_template``'s), and a token is
    labelled when it starts inside an assistant span; all others get -100."""
    text, spans = render(messages, add_generation_prompt)
    enc = tokenizer.encode(text, add_special_tokens=False)
    labels = []
    for tok, (start, _end) in zip(enc.ids, enc.offsets):
        inside = any(s <= start < e for s, e in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return list(enc.ids), labels


# --------------------------------------------------------------------------- JSONL
@dataclass
class BadRecords:
    """Records that were skipped, each with its 1-based line number and why."""

    path: str
    total: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, why: str) -> None:
        self.bad.append((line, why))

    def summary(self, limit: int = 5) -> str:
        """One line: how many records were kept and which lines were skipped, why."""
        kept = self.total - len(self.bad)
        if not self.bad:
            return f"{self.path}: {kept} records, none skipped"
        shown = "; ".join(f"line {n}: {why}" for n, why in self.bad[:limit])
        more = f"; and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        return f"{self.path}: {kept} of {self.total} records kept, {len(self.bad)} skipped ({shown}{more})"


def check_messages(messages: object, need_assistant: bool = True) -> str | None:
    """Why ``messages`` is not a usable conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} needs 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}, expected one of {ROLES}"
        if not isinstance(m["content"], str):
            return f"message {i} content must be a string"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"message {i} is an empty assistant turn"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


def _records(path: str | Path, report: BadRecords):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.total += 1
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                report.add(n, f"invalid JSON ({exc.msg})")


def read_chat_jsonl(
    path: str | Path, tokenizer, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], BadRecords]:
    """Encoded ``(ids, labels)`` of each good record of a messages JSONL file,
    and the report of bad ones (bad format, or longer than ``max_length`` tokens:
    truncating would cut an assistant turn's EOS, so such records are skipped and counted)."""
    report = BadRecords(str(path))
    out = []
    for n, rec in _records(path, report):
        why = "record must be an object with 'messages'" if not isinstance(rec, dict) or "messages" not in rec else (
            check_messages(rec["messages"]))
        if why is None:
            ids, labels = encode_chat(tokenizer, rec["messages"])
            if len(ids) > max_length:
                why = f"{len(ids)} tokens, over max_length {max_length}"
            elif all(x == IGNORE_INDEX for x in labels[1:]):
                why = "no trainable tokens"
            else:
                out.append((ids, labels))
        if why is not None:
            report.add(n, why)
    return out, report


def read_preference_jsonl(
    path: str | Path, tokenizer, max_length: int
) -> tuple[list[dict], BadRecords]:
    """Good records of a preference JSONL file (``prompt``, ``chosen``,
    ``rejected`` message lists; ``chosen``/``rejected`` hold the response turns,
    or whole conversations that start with the prompt) encoded as
    ``{"chosen": (ids, labels), "rejected": (ids, labels)}``; and the report."""
    report = BadRecords(str(path))
    out = []
    for n, rec in _records(path, report):
        why = None
        if not isinstance(rec, dict) or not all(k in rec for k in ("chosen", "rejected")):
            why = "record must be an object with 'chosen' and 'rejected'"
        else:
            prompt = rec.get("prompt") or []
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            pair = {}
            for key in ("chosen", "rejected"):
                msgs = rec[key]
                if isinstance(msgs, list) and prompt and msgs[: len(prompt)] != prompt:
                    msgs = list(prompt) + msgs
                why = check_messages(msgs)
                if why is not None:
                    why = f"{key}: {why}"
                    break
                ids, labels = encode_chat(tokenizer, msgs)
                if len(ids) > max_length:
                    why = f"{key}: {len(ids)} tokens, over max_length {max_length}"
                    break
                pair[key] = (ids, labels)
            if why is None:
                out.append(pair)
        if why is not None:
            report.add(n, why)
    return out, report
