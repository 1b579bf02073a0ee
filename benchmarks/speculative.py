"""Speculative decoding against plain greedy decoding: speed, acceptance, identical output.

    python benchmarks/speculative.py                # both kinds, three prompts, 3 rounds
    python benchmarks/speculative.py --tokens 64 --rounds 1 --no-draft

Prompt lookup runs on the default 0.5B model; the draft-model kind runs the 1.5B target with the
0.5B as its draft (they share a tokenizer). Each prompt is decoded greedily with and without
speculation; the script checks the texts are identical and reports tokens/s, the ratio, the
acceptance rate (accepted guesses / proposed) and the tokens emitted per target pass. The
prompts cover a case where speculation should pay (editing code that is in the prompt) and
where it should not (free-form writing). Writes speculative.md / speculative.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# qwenlm's import asks OpenMP to wait passively only while torch is not loaded yet; here torch
# comes first (import order), so ask before it loads (docs/inference.md, "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import qwenlm
from qwenlm.benchmark import machine_info
from qwenlm.generation.generate import collect
from qwenlm.generation.speculative import SpeculationStats

CODE = """def moving_average(values, window):
    result = []
    for i in range(len(values)):
        start = max(0, i - window + 1)
        chunk = values[start:i + 1]
        result.append(sum(chunk) / len(chunk))
    return result


def normalize(values):
    low = min(values)
    high = max(values)
    return [(v - low) / (high - low) for v in values]
"""

PROMPTS = {
    "edit code": "Add type hints and a docstring to each function. Reply with the whole "
    "code only.\n\n```python\n" + CODE + "```",
    "explain code": "Explain what this code does, function by function.\n\n```python\n"
    + CODE
    + "```",
    "free writing": "Write a short story about a lighthouse keeper who finds a message in a "
    "bottle.",
}


def run(model, prompt: str, tokens: int, speculate=None) -> tuple[str, float, float]:
    """The greedy text, completion tokens/s end to end, and tokens/s after the first token
    (decoding alone: the prompt's prefill is the same with and without speculation)."""
    ids = model.encode_chat([{"role": "user", "content": prompt}])
    config = model.generation_config(temperature=0.0, repetition_penalty=1.0, max_new_tokens=tokens)
    t0 = time.perf_counter()
    first_t, first_n, chunks = None, 0, []
    stream = qwenlm.generation.generate.stream_generate(
        model.engine, model.tokenizer, ids, config, speculation=speculate
    )
    for chunk in stream:
        chunks.append(chunk)
        if first_t is None and chunk.completion_tokens:
            first_t, first_n = time.perf_counter(), chunk.completion_tokens
    dt = time.perf_counter() - t0
    result = collect(iter(chunks))
    n = result.completion_tokens
    decode = (n - first_n) / (t0 + dt - first_t) if first_t is not None and n > first_n else 0.0
    return result.text, n / dt, decode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-draft", type=int, default=None, help="default: 5 draft, 7 lookup")
    p.add_argument("--no-draft", action="store_true", help="skip the 1.5B + 0.5B draft runs")
    p.add_argument("--quant", default="auto")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    small = qwenlm.load("qwen2.5-coder-0.5b-instruct", quant=args.quant, pull=True)
    setups = [("prompt lookup (0.5B)", small, None)]
    if not args.no_draft:
        big = qwenlm.load("qwen2.5-coder-1.5b-instruct", quant=args.quant, pull=True)
        setups.append(("draft model (1.5B + 0.5B draft)", big, small))
    rows = []
    for kind, target, draft in setups:
        for name, prompt in PROMPTS.items():
            plain, fast, plain_dec, fast_dec, stats = [], [], [], [], SpeculationStats()
            identical = True
            for _ in range(args.rounds):
                base_text, base_rate, base_dec = run(target, prompt, args.tokens)
                spec = target.speculation(
                    draft, prompt_lookup=draft is None, num_draft=args.num_draft, stats=stats
                )
                text, rate, dec = run(target, prompt, args.tokens, spec)
                identical &= text == base_text
                plain.append(base_rate)
                fast.append(rate)
                plain_dec.append(base_dec)
                fast_dec.append(dec)
            row = {
                "kind": kind,
                "prompt": name,
                "plain_tok_s": statistics.median(plain),
                "speculative_tok_s": statistics.median(fast),
                "plain_decode_tok_s": statistics.median(plain_dec),
                "speculative_decode_tok_s": statistics.median(fast_dec),
                "acceptance": stats.acceptance_rate,
                "tokens_per_pass": stats.emitted / max(stats.target_passes, 1),
                "identical": identical,
            }
            # Each round runs plain and speculative back to back, so the ratio of a round's pair
            # cancels most of a shared machine's slow drifts; the median of those ratios is
            # steadier than the ratio of the two medians.
            row["speedup"] = statistics.median(f / p for f, p in zip(fast, plain, strict=True))
            row["decode_speedup"] = statistics.median(
                f / max(p, 1e-9) for f, p in zip(fast_dec, plain_dec, strict=True)
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = machine_info()
    lines = [
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch "
        f"{info['torch']}, weights {small.weight_format}; greedy, {args.tokens} new tokens, "
        f"{args.num_draft or 'default (5 draft, 7 lookup)'} guesses per pass, medians of "
        f"{args.rounds} rounds; load average "
        f"at the end {', '.join(f'{x:.1f}' for x in info['load_average'])}.",
        "",
        "End to end: completion tokens over the whole request, the prompt's prefill included;"
        " decoding: the tokens after the first over the time after it. Speed-ups are medians"
        " of each round's ratio (plain and speculative run back to back).",
        "",
        "| speculation | prompt | plain tok/s | speculative tok/s | speed-up | decoding: plain"
        " | speculative | speed-up | acceptance | tokens per target pass | same text |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['prompt']} | {r['plain_tok_s']:.1f} | "
            f"{r['speculative_tok_s']:.1f} | {r['speedup']:.2f}x | {r['plain_decode_tok_s']:.1f} | "
            f"{r['speculative_decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
            f"{r['acceptance']:.0%} | "
            f"{r['tokens_per_pass']:.2f} | {'yes' if r['identical'] else 'NO'} |"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.md").write_text(text + "\n")
    (out / "speculative.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
