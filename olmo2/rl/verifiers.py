"""Verifiable rewards: programs that say whether a completion is right.

What this module owns:

* the verifiers, each a pure function ``(completion: str, reference) -> bool``
  (or a score in [0, 1]) with no model or tokenizer in sight:

  - :func:`verify_gsm8k`: the last number of the completion (or the first one
    after its last ``####``, GSM8K's own answer mark) equals the reference
    number, compared exactly as rationals after dropping thousands commas,
    currency and units (``$1,234.50``, ``12 dollars``, ``12%``), so ``3.50`` is
    ``3.5``, ``42.0`` is ``42`` and ``3/4`` is ``0.75``;
  - :func:`verify_math`: the content of the completion's last ``\\boxed{...}``
    (balanced braces) equals the reference after :func:`normalize_math`, or both
    are the same simple number (``0.5`` and ``\\frac{1}{2}``); no box, no reward;
  - :func:`verify_ifeval`: instruction constraints in the manner of IFEval,
    each a JSON-able dict (see :data:`CONSTRAINTS`), a list of them meaning all;
* :data:`VERIFIERS`, the registry by name, :func:`register_verifier` for users'
  own, and :func:`reward`, which dispatches on a record's ``"verifier"`` field
  and pays :data:`VERIFICATION_REWARD` for a verified answer, 0 otherwise.

The bonus is Tülu 3's: open-instruct's RLVR trainers
(``open_instruct/grpo_fast.py``, ``Args.verification_reward: float = 10.0``,
likewise its PPO trainers) give 10.0 to a verified answer and nothing to the
rest. For GRPO the scale cancels in the group-normalized advantages; it matters
against a KL penalty or a reward model added to it.
"""
from __future__ import annotations

import json
import re
from fractions import Fraction
from typing import Any, Callable, Mapping

VERIFICATION_REWARD = 10.0

Verifier = Callable[[str, Any], "bool | float"]

# --------------------------------------------------------------------------- numbers (GSM8K)
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # 1,234,567 or 1234567
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])([-+\u2212]))?"  # a sign right before the number, unless a binary minus (3-2)
    r"(?:\$\s?)?"  # currency
    rf"((?:{_INT})?\.\d+|{_INT})"  # 12, 12.5, .5, 1,234.50
    rf"(?:\s?/\s?({_INT}))?"  # a simple fraction 3/4
)


def _to_fraction(sign: str, number: str, denominator: str | None) -> Fraction | None:
    value = Fraction(number.replace(",", ""))
    if denominator is not None:
        den = Fraction(denominator.replace(",", ""))
        if den == 0:
            return None
        value /= den
    return -value if sign in ("-", "\u2212") else value


def numbers_in(text: str) -> list[Fraction]:
    """Every number in ``text``, in order, as an exact rational (commas, ``$`` and a
    leading sign handled; ``%`` and units after it ignored)."""
    out = []
    for m in _NUMBER.finditer(text):
        value = _to_fraction(m.group(1) or "", m.group(2), m.group(3))
        if value is not None:
            out.append(value)
    return out


def gsm8k_answer(text: str) -> Fraction | None:
    """The answer of a GSM8K-style solution: the first number after the last
    ``####`` if there is one, else the last number of the text; None if none."""
    if "####" in text:
        found = numbers_in(text.rsplit("####", 1)[1])
        if found:
            return found[0]
    found = numbers_in(text)
    return found[-1] if found else None


def verify_gsm8k(completion: str, reference: Any) -> bool:
    """The completion's final number (see :func:`gsm8k_answer`) equals the reference's."""
    expected = reference if isinstance(reference, (int, Fraction)) and not isinstance(reference, bool) else None
    if expected is None:
        expected = gsm8k_answer(str(reference))
    if expected is None:
        raise ValueError(f"gsm8k verifier: the reference {reference!r} holds no number")
    got = gsm8k_answer(completion)
    return got is not None and got == Fraction(expected)


# --------------------------------------------------------------------------- MATH
def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) of ``text``,
    nested braces kept; None when there is none or it never closes."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


_TEXT_UNIT = re.compile(r"(?<=[\d})])\s*\\(?:text|textbf|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}\s*(?:\^\{?\d\}?)?$")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+|[a-zA-Z])")
_SIMPLE_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH_FRAC = re.compile(r"^(-?\d+)/(\d+)$")
_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def normalize_math(answer: str) -> str:
    """A canonical spelling of a MATH answer, for string comparison.

    Drops spaces, ``\\left``/``\\right``, ``\\!``/``\\,``-style spacing,
    ``\\displaystyle``, dollar signs, degrees (``^{\\circ}``), percent signs, a
    trailing unit in ``\\text{...}`` (``5\\text{ cm}``), a trailing period and a
    leading ``x =``; unwraps other ``\\text{...}``; spells ``\\dfrac``/``\\tfrac``
    as ``\\frac`` and ``\\frac12`` as ``\\frac{1}{2}``, ``\\sqrt2`` as ``\\sqrt{2}``;
    ``10{,}000`` and ``10,000`` as ``10000``; ``.5`` as ``0.5``.
    """
    s = answer.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\displaystyle", "")
    for spacing in ("\\,", "\\;", "\\:", "\\quad", "\\qquad", "~"):
        s = s.replace(spacing, " ")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    s = _TEXT_UNIT.sub("", s).strip()
    s = _TEXT.sub(r"\1", s)
    s = s.replace("\\ ", " ")
    s = s.replace(" ", "")
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[a-zA-Z]\w{0,1}=.+", s):  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    s = _FRAC_SHORT.sub(lambda m: "\\frac" + "".join(g if g.startswith("{") else "{" + g + "}" for g in m.groups()), s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    if s.startswith("."):
        s = "0" + s
    elif s.startswith("-."):
        s = "-0" + s[1:]
    return s.rstrip(".")


def _simple_value(s: str) -> Fraction | None:
    """The value of a normalized answer that is an integer, a decimal or a fraction of integers."""
    if _DECIMAL.match(s):
        return Fraction(s)
    m = _SIMPLE_FRAC.match(s) or _SLASH_FRAC.match(s)
    if m is None:
        return None
    sign, num, den = m.groups() if len(m.groups()) == 3 else ("", *m.groups())
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value


def verify_math(completion: str, reference: Any) -> bool:
    """The last ``\\boxed{}`` of the completion equals the reference (itself boxed or not)."""
    got = last_boxed(completion)
    if got is None:
        return False
    ref = str(reference)
    ref = last_boxed(ref) if "\\boxed" in ref or "\\fbox" in ref else ref
    if ref is None or not ref.strip():
        raise ValueError(f"math verifier: the reference {reference!r} is empty or an unclosed \\boxed")
    a, b = normalize_math(got), normalize_math(ref)
    if a == b:
        return True
    va, vb = _simple_value(a), _simple_value(b)
    return va is not None and va == vb


# --------------------------------------------------------------------------- IFEval-style constraints
_RELATIONS = {
    "at_least": lambda count, n: count >= n,
    "at_most": lambda count, n: count <= n,
    "less_than": lambda count, n: count < n,
    "more_than": lambda count, n: count > n,
    "exactly": lambda count, n: count == n,
    "around": lambda count, n: abs(count - n) <= max(round(0.1 * n), 1),  # IFEval's "around": within 10 %
}


def _field(spec: Mapping, name: str, kind: type | tuple, where: str) -> Any:
    if name not in spec:
        raise ValueError(f"ifeval verifier: {where} has no {name!r} field")
    value = spec[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ValueError(f"ifeval verifier: {where} field {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _counted(count: int, spec: Mapping, where: str) -> bool:
    relation = str(_field(spec, "relation", str, where)).replace(" ", "_")
    if relation not in _RELATIONS:
        raise ValueError(f"ifeval verifier: {where} field 'relation' must be one of {sorted(_RELATIONS)}, "
                         f"got {spec['relation']!r}")
    n = _field(spec, "n", int, where)
    return _RELATIONS[relation](count, n)


def count_words(text: str) -> int:
    """Words as IFEval counts them (runs of word characters)."""
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    """Sentences: non-empty stretches ended by ``.``, ``!`` or ``?`` followed by a
    space or the end (a plain splitter; IFEval uses nltk's, which also knows
    abbreviations such as "Dr.")."""
    parts = re.split(r"(?<=[.!?])(?:\s+|$)", text.strip())
    return sum(1 for p in parts if re.search(r"\w", p))


def _words(spec: Mapping, name: str, where: str) -> list[str]:
    words = _field(spec, name, list, where)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"ifeval verifier: {where} field {name!r} must be a non-empty list of non-empty strings, "
                         f"got {words!r}")
    return words


def _has_word(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def _json_body(text: str) -> str:
    s = text.strip()
    fence = re.fullmatch(r"```(?:json|JSON|Json)?\s*\n?(.*?)\n?\s*```", s, flags=re.DOTALL)
    return fence.group(1) if fence else s


def _is_json(text: str) -> bool:
    try:
        json.loads(_json_body(text))
    except ValueError:
        return False
    return True


def count_bullets(text: str) -> int:
    """Markdown bullet lines: ``* item`` or ``- item`` (not ``**bold**`` or ``---``)."""
    return len(re.findall(r"^\s*(?:\*(?!\*)|-(?!-))\s+\S", text, flags=re.MULTILINE))


CONSTRAINTS: dict[str, Callable[[str, Mapping, str], bool]] = {
    # {"type": "word_count", "relation": "at_least" | "at_most" | "less_than" | "more_than" | "exactly", "n": 50}
    "word_count": lambda text, spec, where: _counted(count_words(text), spec, where),
    # {"type": "sentence_count", "relation": ..., "n": 3}
    "sentence_count": lambda text, spec, where: _counted(count_sentences(text), spec, where),
    # {"type": "keywords", "keywords": ["apple", "pie"]}: all of them, as whole words, any case
    "keywords": lambda text, spec, where: all(_has_word(text, w) for w in _words(spec, "keywords", where)),
    # {"type": "forbidden_words", "words": ["very"]}: none of them, as whole words, any case
    "forbidden_words": lambda text, spec, where: not any(_has_word(text, w) for w in _words(spec, "words", where)),
    # {"type": "json_format"}: the whole answer parses as JSON, a ```json fence allowed around it
    "json_format": lambda text, spec, where: _is_json(text),
    # {"type": "bullet_count", "n": 3}: exactly n bullet lines ("* " or "- "); "relation" optional
    "bullet_count": lambda text, spec, where: _counted(count_bullets(text), {"relation": "exactly", **spec}, where),
    # {"type": "lowercase"}: no capital letter anywhere
    "lowercase": lambda text, spec, where: text == text.lower() and bool(text.strip()),
    # {"type": "uppercase"}: no small letter anywhere
    "uppercase": lambda text, spec, where: text == text.upper() and bool(text.strip()),
    # {"type": "ends_with", "phrase": "Is there anything else?"}: the answer's last words, any case
    "ends_with": lambda text, spec, where: text.strip().lower().endswith(_field(spec, "phrase", str, where).strip().lower()),
    # {"type": "no_comma"}
    "no_comma": lambda text, spec, where: "," not in text,
}


# Tülu 3's RLVR instruction-following records (open-instruct's if_functions.py) name a
# checking function and its arguments: {"func_name": "validate_word_constraint",
# "N": 50, "quantifier": "at least", ...}. Those with a constraint here are read as it
# (keywords and forbidden words are whole words here, substrings there; words are
# runs of word characters here, whitespace-separated there).
TULU3_FUNCS: dict[str, Callable[[Mapping], dict]] = {
    "verify_keywords": lambda a: {"type": "keywords", "keywords": a.get("keyword_list")},
    "validate_forbidden_words": lambda a: {"type": "forbidden_words", "words": a.get("forbidden_words")},
    "validate_word_constraint": lambda a: {"type": "word_count", "relation": a.get("quantifier"), "n": a.get("N")},
    "verify_sentence_constraint": lambda a: {"type": "sentence_count", "relation": a.get("quantifier"), "n": a.get("N")},
    "verify_bullet_points": lambda a: {"type": "bullet_count", "n": a.get("N")},
    "validate_json_format": lambda a: {"type": "json_format"},
    "validate_lowercase": lambda a: {"type": "lowercase"},
    "validate_uppercase": lambda a: {"type": "uppercase"},
    "validate_end": lambda a: {"type": "ends_with", "phrase": a.get("end_phrase")},
    "validate_no_commas": lambda a: {"type": "no_comma"},
}


def ifeval_constraints(reference: Any) -> list[Mapping]:
    """The constraint dicts of a reference: a dict, a list of dicts, or either as a JSON
    string; Tülu 3's ``{"func_name": ...}`` records are translated (:data:`TULU3_FUNCS`)."""
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except ValueError:
            raise ValueError(f"ifeval verifier: the reference is a string but not JSON: {reference[:80]!r}") from None
    specs = [reference] if isinstance(reference, Mapping) else reference
    if not isinstance(specs, list) or not specs or not all(isinstance(s, Mapping) for s in specs):
        raise ValueError(f"ifeval verifier: the reference must be a constraint dict or a non-empty list of them, "
                         f"got {reference!r}")
    specs = list(specs)
    for i, spec in enumerate(specs):
        if "type" not in spec and "func_name" in spec:
            func = spec["func_name"]
            if func not in TULU3_FUNCS:
                raise ValueError(f"ifeval verifier: constraint {i} field 'func_name' = {func!r} has no counterpart here "
                                 f"(one of {sorted(TULU3_FUNCS)})")
            spec = specs[i] = TULU3_FUNCS[func](spec)
        kind = spec.get("type")
        if kind not in CONSTRAINTS:
            raise ValueError(f"ifeval verifier: constraint {i} field 'type' must be one of {sorted(CONSTRAINTS)}, got {kind!r}")
    return specs


def verify_ifeval(completion: str, reference: Any) -> bool:
    """Every constraint of the reference holds for the completion."""
    return all(
        CONSTRAINTS[spec["type"]](completion, spec, f"constraint {i} ({spec['type']})")
        for i, spec in enumerate(ifeval_constraints(reference))
    )


# --------------------------------------------------------------------------- registry and reward
VERIFIERS: dict[str, Verifier] = {"gsm8k": verify_gsm8k, "math": verify_math, "ifeval": verify_ifeval}


def register_verifier(name: str, fn: Verifier | None = None, *, replace: bool = False):
    """Add ``fn(completion, reference) -> bool | float in [0, 1]`` to :data:`VERIFIERS`
    under ``name`` (records then name it in ``"verifier"``). Usable as a decorator:
    ``@register_verifier("mine")``. An existing name needs ``replace=True``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_verifier: name must be a non-empty string, got {name!r}")

    def add(f: Verifier) -> Verifier:
        if not callable(f):
            raise TypeError(f"register_verifier: {name!r} must be given a function (completion, reference), "
                            f"got {type(f).__name__}")
        if name in VERIFIERS and not replace and VERIFIERS[name] is not f:
            raise ValueError(f"register_verifier: {name!r} is already registered; pass replace=True to replace it")
        VERIFIERS[name] = f
        return f

    return add if fn is None else add(fn)


def reward(sample_text: str, record: Mapping, *, bonus: float = VERIFICATION_REWARD) -> float:
    """The reward of a completion for a prompt record: ``bonus`` times its verifier's
    verdict (True: 1, False: 0, a score in [0, 1] as it is).

    ``record["verifier"]`` names the verifier (Tülu 3's ``"dataset"`` is read too; a name
    registered in lower case matches in any case) and
    ``record["reference"]`` is what it checks against (or Tülu 3's ``"ground_truth"``).
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"reward: the record must be a dict, got {type(record).__name__}")
    name = record.get("verifier", record.get("dataset"))
    if name is None:
        raise ValueError(f"reward: the record has no 'verifier' field (one of {sorted(VERIFIERS)})")
    if isinstance(name, str) and name not in VERIFIERS and name.lower() in VERIFIERS:
        name = name.lower()  # Tülu 3's sets say "MATH"; open-instruct looks names up lowercased
    if not isinstance(name, str) or name not in VERIFIERS:
        raise ValueError(f"reward: the record's 'verifier' field is {name!r}, not one of {sorted(VERIFIERS)}")
    reference = record.get("reference", record.get("ground_truth"))
    if reference is None:
        raise ValueError(f"reward: the record has no 'reference' field (what the {name!r} verifier checks against)")
    verdict = VERIFIERS[name](sample_text, reference)
    if isinstance(verdict, bool):
        return bonus if verdict else 0.0
    score = float(verdict)
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"reward: verifier {name!r} returned {verdict!r}; a verifier returns a bool or a score in [0, 1]")
    return bonus * score
