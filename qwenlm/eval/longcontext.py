"""Long-context evaluation: perplexity by context length, and needle in a haystack.

Both compare *variants* of one loaded model: the same weights under other long-context
settings (``{"rope_scaling": {...}}``, ``{"dual_chunk_attention_config": {...}}``, Hugging Face
config keys), built by :func:`variant` without copying a tensor. Both run the plain model path
(one forward per window; prefill then greedy decode through the plain KV cache), because the
batched engine attends over full contexts only.

- :func:`perplexity_by_length`: the perplexity of the same tokens of a long text (the last 512
  of a window) read with 1k, 2k, ... n tokens of context before them, one forward per window.
  The output head runs a slice of positions at a time, so a 64k window never holds a
  64k x vocab logit matrix.
- :func:`needle_grid`: a passcode sentence hidden at each depth of a haystack of each length,
  then the question; a cell scores 1 when the greedy answer contains the passcode.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.errors import QwenlmError
from qwenlm.generation.cache import make_cache
from qwenlm.models import build_model


class LongContextError(QwenlmError):
    """Bad settings for a long-context evaluation."""


def default_variants(config: ModelConfig, factor: float = 4.0) -> dict[str, dict[str, Any]]:
    """base, YaRN (``factor`` x the trained context) and dual chunk attention (chunks of it)."""
    trained = config.max_position_embeddings
    return {
        "base": {},
        "yarn": {
            "rope_scaling": {
                "type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": trained,
            }
        },
        "dca": {
            "dual_chunk_attention_config": {
                "chunk_size": trained,
                "local_size": max(trained // 8, 1),
                "original_max_position_embeddings": trained,
            }
        },
    }


def variant(model: nn.Module, overrides: Mapping[str, Any]) -> nn.Module:
    """``model`` with other config values (HF keys), sharing its weights."""
    if not overrides:
        return model
    config = ModelConfig.from_hf({**model.config.to_hf(), **overrides})
    p = next(model.parameters())
    return build_model(config, model.state_dict().items(), dtype=p.dtype, device=p.device)


def parse_lengths(spec: str) -> list[int]:
    """``"1k,2k,4096"`` -> [1024, 2048, 4096]."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        try:
            n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise LongContextError(
                f"bad length {part!r}", hint="use e.g. 1k,2k,4k or 1024"
            ) from None
        if n < 2:
            raise LongContextError(f"length {n} is too short")
        out.append(n)
    return out


def window_nll(model: nn.Module, ids: Sequence[int], head_rows: int = 1024) -> torch.Tensor:
    """-log p(token | prefix) for tokens 1..n-1 of ``ids`` (n - 1 values), in one forward."""
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        h = model.model(x)[0]  # (n, hidden)
        out = []
        for a in range(0, len(ids) - 1, head_rows):
            b = min(a + head_rows, len(ids) - 1)
            logprobs = torch.log_softmax(model.lm_head(h[a:b]).float(), dim=-1)
            out.append(-logprobs.gather(1, x[0, a + 1 : b + 1, None])[:, 0])
    return torch.cat(out).cpu()


@dataclass
class PplRow:
    variant: str
    length: int
    ppl: float  # over the scored tokens at the end of each window
    tokens: int  # tokens scored
    seconds: float


def perplexity_by_length(
    model: nn.Module,
    ids: Sequence[int],
    lengths: Sequence[int],
    variants: Mapping[str, Mapping[str, Any]],
    *,
    score_last: int = 512,
    windows: int = 1,
    progress: bool = True,
    on_row: Callable[[PplRow], None] | None = None,
) -> list[PplRow]:
    """One row per (variant, length): perplexity of the same ``score_last`` tokens of the text,
    read with ``length`` tokens of context.

    Every window of every length ends at the same token E (the longest length, or the text's
    end), so each row scores the same tokens and only the context before them grows. With
    ``windows`` > 1, further windows end ``score_last`` tokens later each.
    """
    from tqdm import tqdm

    if score_last < 1 or any(n <= score_last for n in lengths):
        raise LongContextError(
            f"every length must exceed score_last ({score_last})", hint="raise --lengths"
        )
    end = max(lengths)
    need = end + (windows - 1) * score_last
    if need > len(ids):
        raise LongContextError(
            f"the text has {len(ids)} tokens, too few for {windows} window(s) of {end}",
            hint="use a longer text or shorter --lengths",
        )
    rows = []
    jobs = [(name, n) for name in variants for n in lengths]
    bar = tqdm(jobs, desc="perplexity", unit="window", disable=not progress)
    built: dict[str, nn.Module] = {}
    for name, n in bar:
        bar.set_postfix_str(f"{name} {n}")
        net = built.get(name) or built.setdefault(name, variant(model, variants[name]))
        t0 = time.perf_counter()
        stops = [end + w * score_last for w in range(windows)]
        nll = torch.cat([window_nll(net, ids[e - n : e])[-score_last:] for e in stops])
        row = PplRow(name, n, math.exp(float(nll.mean())), nll.numel(), time.perf_counter() - t0)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def ppl_table(rows: Sequence[PplRow]) -> str:
    """A Markdown table: one row per context length, a column of perplexity per variant."""
    names = list(dict.fromkeys(r.variant for r in rows))
    lengths = sorted({r.length for r in rows})
    cell = {(r.variant, r.length): r for r in rows}
    lines = ["| tokens | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for n in lengths:
        vals = []
        for v in names:
            r = cell.get((v, n))
            vals.append(f"{r.ppl:.2f}" if r else "")
        lines.append(f"| {n:,} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# -- needle in a haystack -----------------------------------------------------------------------

QUESTION = "What is the secret passcode mentioned in the text above? Answer with the number only."


def greedy(
    model: nn.Module, ids: Sequence[int], max_new_tokens: int, stop: Sequence[int]
) -> list[int]:
    """Greedy continuation of ``ids`` through the plain KV cache (prefill, then one at a time)."""
    device = next(model.parameters()).device
    cache = make_cache(model)
    out: list[int] = []
    x = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(model(x, cache, logits_at=-1)[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
            x = torch.tensor([[token]], device=device)
    return out


@dataclass
class NeedleCell:
    variant: str
    length: int
    depth: float
    found: bool
    answer: str


def needle_prompt(
    encode_chat: Callable[[list[dict[str, str]]], list[int]],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    haystack_ids: Sequence[int],
    length: int,
    depth: float,
    passcode: str,
) -> list[int]:
    """Chat prompt ids of about ``length`` tokens with the needle at ``depth`` (0 = start)."""
    needle = f" The secret passcode is {passcode}. Remember it: {passcode}. "
    overhead = len(encode_chat([{"role": "user", "content": needle + "\n\n" + QUESTION}]))
    body = max(length - overhead, 16)
    if body > len(haystack_ids):
        raise LongContextError(
            f"the haystack has {len(haystack_ids)} tokens, fewer than the {body} needed",
            hint="use a longer --data text",
        )
    hay = list(haystack_ids[:body])
    cut = round(depth * body)
    text = decode(hay[:cut]) + needle + decode(hay[cut:])
    return encode_chat([{"role": "user", "content": text + "\n\n" + QUESTION}])


def needle_grid(
    qwen: Any,
    haystack: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    variants: Mapping[str, Mapping[str, Any]],
    *,
    seed: int = 0,
    progress: bool = True,
    on_cell: Callable[[NeedleCell], None] | None = None,
) -> list[NeedleCell]:
    """Run the grid for a loaded :class:`~qwenlm.api.Qwen` model, one variant at a time."""
    from tqdm import tqdm

    tok = qwen.tokenizer
    hay = tok.encode(haystack)
    rng = random.Random(seed)
    stop = set(tok.stop_token_ids)
    cells = []
    jobs = [(v, n, d) for v in variants for n in lengths for d in depths]
    bar = tqdm(jobs, desc="needle", unit="prompt", disable=not progress)
    built: dict[str, nn.Module] = {}
    for name, n, d in bar:
        bar.set_postfix_str(f"{name} {n} @{d:.0%}")
        net = built.get(name) or built.setdefault(name, variant(qwen.model, variants[name]))
        passcode = str(rng.randrange(10_000, 100_000))
        ids = needle_prompt(qwen.encode_chat, tok.encode, tok.decode, hay, n, d, passcode)
        answer = tok.decode(greedy(net, ids, 12, stop))
        cell = NeedleCell(name, n, d, passcode in answer, answer.strip())
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell)
    return cells


def heatmap(cells: Sequence[NeedleCell], path: str | Path, title: str = "") -> Path:
    """One panel per variant: depth (rows) x length (columns), green where the needle was found."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LongContextError(
            "the heatmap needs matplotlib", hint="pip install 'qwenlm[eval]'"
        ) from None
    names = list(dict.fromkeys(c.variant for c in cells))
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    fig, axes = plt.subplots(1, len(names), figsize=(1.5 + 0.55 * len(lengths) * len(names), 3.4))
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names, strict=True):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for c in cells:
            if c.variant == name:
                grid[depths.index(c.depth), lengths.index(c.length)] = float(c.found)
        ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(
            range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths]
        )
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name)
    axes[0].set_ylabel("needle depth")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
