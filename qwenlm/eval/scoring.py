"""Scoring helpers shared by the tasks: pass@k, answer extraction and normalisation, Rouge-L."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al., 2021).

    1 - C(n-c, k) / C(n, k), computed as a product so large ``n`` does not overflow.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# -- code ------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)


def extract_code(text: str, *, language: str = "python") -> str:
    """The code of a model reply: the first fenced block in ``language`` (or unlabelled), else
    the first fenced block, else the whole text. An unclosed fence runs to the end."""
    blocks = _FENCE.findall(text)
    for lang, body in blocks:
        if lang.lower() in (language, "py", ""):
            return body
    return blocks[0][1] if blocks else text


# -- numbers (GSM8K) -------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``None`` when ``text`` is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if value == int(value):
        return str(int(value))
    return repr(value)


def extract_number(text: str) -> str | None:
    """The final numeric answer of a worked solution: after ``####`` or "the answer is" if
    present, else the last number in the text; normalised by :func:`normalize_number`."""
    for marker in ("####", "answer is", "Answer:", "answer:"):
        i = text.rfind(marker)
        if i >= 0:
            found = _NUMBER.findall(text[i + len(marker) :])
            if found:
                return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


# -- LaTeX answers (MATH) --------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5": the argument is the next token
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_UNITS = (
    "degrees",
    "degree",
    "cm",
    "meters",
    "inches",
    "inch",
    "units",
    "unit",
    "feet",
    "dollars",
    "cents",
    "hours",
    "minutes",
    "seconds",
    "sq",
    "square",
)


def normalize_math(answer: str) -> str:
    """Canonical form of a MATH answer, so that equal answers written differently compare equal
    (the normalisation of Hendrycks et al.'s ``is_equiv``, extended with a few common cases)."""
    s = answer.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    for unit in _UNITS:
        s = re.sub(rf"(\d)\s*\\?\s*{unit}(\^2)?\b", r"\1", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" -> "5" when the left side is a short name
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = s.rstrip(".")
    number = normalize_number(s) if re.fullmatch(r"-?[\d,]*\.?\d+", s) else None
    return number if number is not None else s


def math_equal(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    return normalize_math(predicted) == normalize_math(reference)


# -- multiple choice -------------------------------------------------------------------------
def extract_choice(text: str, letters: Sequence[str] = "ABCD") -> str | None:
    """The answer letter in a free-form reply: "答案是 B", "The answer is (C)", "**D**", "A."."""
    body = "".join(letters)
    patterns = [
        rf"(?:answer|Answer|ANSWER)\s*(?:is|:|：)?\s*(?:option\s*)?[\(\[\*]*([{body}])\b",
        rf"答案\s*(?:是|为|：|:)?\s*[\(（\*]*([{body}])",
        rf"^\s*[\(\*]*([{body}])[\)\.:：\*]?\s*(?:$|\s)",
        rf"\b([{body}])\b",
    ]
    for pattern in patterns:
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            return m.group(1)
    for ch in text:  # Chinese replies often write the letter with no word boundary
        if ch in letters:
            return ch
    return None


# -- text similarity -------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    # Words for alphabetic scripts, single characters for CJK, so Chinese compares sensibly.
    return re.findall(r"[\u4e00-\u9fff\u3040-\u30ff]|[^\W_]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 between two strings (longest common subsequence of tokens)."""
    a, b = _tokens(prediction), _tokens(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)
