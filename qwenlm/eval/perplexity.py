"""Perplexity of a model on a text file, in sliding windows.

The text is tokenized once and cut into windows of ``context`` tokens; each window after the
first starts ``context - stride`` tokens back, and only its last ``stride`` tokens are scored,
so every token is scored once with at least that much context (the usual strided evaluation).
Reports perplexity, mean negative log-likelihood per token, and bits per byte (comparable
across tokenizers).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from qwenlm.eval.run import EvalEngine, EvalError


def token_nll(model: Any, ids: list[int], score_from: int) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over ``ids[score_from:]`` (``score_from`` >= 1), and count."""
    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        logits = model.model(x)[0].float()  # (T, vocab)
    logprobs = torch.log_softmax(logits[score_from - 1 : -1], dim=-1)
    target = x[0, score_from:]
    nll = -logprobs.gather(1, target[:, None]).sum()
    return float(nll), int(target.numel())


class Perplexity:
    name = "perplexity"

    def __init__(
        self, data: str | Path | None = None, *, context: int = 1024, stride: int | None = None
    ) -> None:
        if data is None:
            raise EvalError("perplexity needs a text file", hint="pass --data FILE.txt (UTF-8)")
        self.data = Path(data)
        if context < 2:
            raise EvalError(f"context must be >= 2, got {context}")
        self.context = context
        self.stride = stride or context // 2
        if not 1 <= self.stride <= context - 1:
            raise EvalError(f"stride must be in 1..{context - 1}, got {self.stride}")
        self._text: str | None = None

    def config(self) -> dict[str, Any]:
        return {"data": str(self.data), "context": self.context, "stride": self.stride}

    def load(self) -> list[dict[str, Any]]:
        if not self.data.is_file():
            raise EvalError(f"no such text file: {self.data}")
        try:
            self._text = self.data.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EvalError(f"{self.data} is not UTF-8 text") from None
        if not self._text.strip():
            raise EvalError(f"{self.data} is empty")
        return [{"id": 0, "whole": True}]  # windows depend on the tokenizer: made in evaluate

    def windows(self, n_tokens: int) -> list[tuple[int, int, int]]:
        """(start, end, score_from) per window; tokens [score_from, end) are scored in it."""
        out = [(0, min(self.context, n_tokens), 1)]
        scored_to = out[0][1]
        while scored_to < n_tokens:
            end = min(scored_to + self.stride, n_tokens)
            start = max(0, end - self.context)
            out.append((start, end, scored_to - start))
            scored_to = end
        return out

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._text is None:
            self.load()
        ids = engine.tokenizer.encode(self._text)
        if len(ids) < 2:
            raise EvalError(f"{self.data} is shorter than two tokens")
        total, count = 0.0, 0
        for start, end, score_from in self.windows(len(ids)):
            nll, n = token_nll(engine.model, ids[start:end], score_from)
            total, count = total + nll, count + n
        n_bytes = len(self._text.encode("utf-8"))
        return [
            {
                "id": 0,
                "nll": total,
                "tokens": count,
                "bytes": n_bytes,
                "score": math.exp(total / count),
            }
        ]

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        r = records[0]
        return {
            "perplexity": math.exp(r["nll"] / r["tokens"]),
            "nll_per_token": r["nll"] / r["tokens"],
            "bits_per_byte": r["nll"] / math.log(2) / r["bytes"],
            "tokens": float(r["tokens"]),
        }
