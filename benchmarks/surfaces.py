"""One numeric path, measured: the same prompts through every surface, and the server's TTFT.

For each prompt (five, from one line to ~4,000 tokens), greedy, this runs
- `qwenlm generate --greedy` (the CLI, a subprocess),
- the Python API (`Qwen.chat_chunks`), which also times the prefill alone,
- `qwenlm serve` (a subprocess) with the request alone, and beside 7 other streams,
and checks that all four give the same text. Then it times the server's time to first token
for the ~2,048-token prompt against the API's prefill of the same prompt (medians of
--rounds, interleaved) and prints the ratio (issue 13: at most 1.15).

    python benchmarks/surfaces.py                 # default model, 3 rounds
    python benchmarks/surfaces.py --rounds 1 --tokens 16
Writes surfaces.json / surfaces.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, start

import qwenlm
from qwenlm import registry
from qwenlm.benchmark import machine_info, text_tokens

ROOT = Path(__file__).resolve().parent.parent


def prompts(model: qwenlm.Qwen) -> dict[str, str]:
    """Five user messages: short, code, and long texts of ~1,000, ~2,048 and ~4,000 tokens."""

    def text_of(n: int) -> str:
        return model.tokenizer.decode(text_tokens(model, n))

    return {
        "short": "Write a Python function that checks whether a number is prime.",
        "code": "Add type hints to this function:\n\ndef merge(a, b):\n    out = []\n"
        "    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
        "    return out + a + b\n",
        "1k": "Summarize this text in two sentences:\n\n" + text_of(1000),
        "2k": "Summarize this text in two sentences:\n\n" + text_of(2030),
        "4k": "Summarize this text in two sentences:\n\n" + text_of(3980),
    }


def cli(model_path: str, prompt: str, tokens: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "qwenlm", "generate", "-m", model_path, "-", "--greedy",
         "--max-new-tokens", str(tokens)],
        input=prompt, capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return out.stdout.removesuffix("\n")


def api(model: qwenlm.Qwen, prompt: str, tokens: int) -> str:
    chunks = model.chat_chunks(
        [{"role": "user", "content": prompt}], max_new_tokens=tokens, temperature=0
    )
    return "".join(c.text for c in chunks)


def prefill_seconds(model: qwenlm.Qwen, prompt: str) -> float:
    """What `qwenlm generate` spends before its first token: the prompt's prefill."""
    ids = model.encode_chat([{"role": "user", "content": prompt}])
    t0 = time.perf_counter()
    logits = model.engine.prefill(model.engine.new_sequence(), ids)
    int(logits.argmax())
    return time.perf_counter() - t0


def ask(url: str, prompt: str, tokens: int, *, stream: bool = False) -> tuple[str, float]:
    """(reply text, seconds to the first content token)."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
    }
    t0 = time.perf_counter()
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=3600)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"], float("nan")
    text, first = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - t0
            text += delta
    return text, first if first is not None else float("nan")


def with_noise(url: str, fn, streams: int = 7):
    """Run ``fn()`` while ``streams`` other requests stream replies."""
    stop = threading.Event()

    def noise(i: int) -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": f"Count from {i} to 1000, one per line."}],
            "max_tokens": 2000,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=noise, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(3)  # they are admitted and decoding
    try:
        return fn()
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or path")
    p.add_argument("--ttft-only", action="store_true", help="only the time-to-first-token part")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per reply")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()

    path = str(registry.resolve(args.model, pull=True))
    model = qwenlm.load(path)
    texts = prompts(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.out / "surfaces-server.log"
    args.out.mkdir(parents=True, exist_ok=True)
    server = start(
        [
            sys.executable,
            "-m",
            "qwenlm",
            "serve",
            path,
            "--port",
            str(port),
            "--served-model-name",
            "m",
        ],
        url,
        {},
        log,
    )
    rows, same = [], True
    try:
        for name, prompt in texts.items() if not args.ttft_only else ():
            n = len(model.encode_chat([{"role": "user", "content": prompt}]))
            outs = {
                "cli": cli(path, prompt, args.tokens),
                "api": api(model, prompt, args.tokens),
                "server": ask(url, prompt, args.tokens)[0],
                "server+7": with_noise(url, lambda p=prompt: ask(url, p, args.tokens)[0]),
            }
            equal = len(set(outs.values())) == 1
            same &= equal
            rows.append({"prompt": name, "tokens": n, "identical": equal, "outputs": outs})
            print(f"{name:6s} {n:5d} tokens  identical: {equal}", flush=True)
        prefill, ttft = [], []
        for k in range(args.rounds):  # interleaved, so drift hits both alike
            # A fresh opening each round: the server's prefix cache must not serve the prompt
            # (its earlier requests above sent the same text).
            prompt = f"Round {k}, request {time.time_ns()}.\n" + texts["2k"]
            prefill.append(prefill_seconds(model, prompt))
            ttft.append(ask(url, prompt, 1, stream=True)[1])
    finally:
        server.terminate()
        server.wait(60)
    n2k = len(model.encode_chat([{"role": "user", "content": texts["2k"]}]))
    result = {
        "machine": machine_info(),
        "rows": rows,
        "all_identical": same,
        "ttft_prompt_tokens": n2k,
        "prefill_s": statistics.median(prefill),
        "server_ttft_s": statistics.median(ttft),
        "ratio": statistics.median(ttft) / statistics.median(prefill),
    }
    md = [
        f"Machine: {result['machine'].get('cpu', '?')}; greedy, {args.tokens} tokens per reply",
        "",
        "| prompt | tokens | cli = api = server = server beside 7 streams |",
        "|---|---|---|",
        *(f"| {r['prompt']} | {r['tokens']} | {'yes' if r['identical'] else 'NO'} |" for r in rows),
        "",
        f"{n2k}-token prompt: prefill {result['prefill_s']:.2f} s (API), server time to first "
        f"token {result['server_ttft_s']:.2f} s: ratio {result['ratio']:.3f} "
        f"(medians of {args.rounds})",
    ]
    (args.out / "surfaces.md").write_text("\n".join(md) + "\n")
    (args.out / "surfaces.json").write_text(json.dumps(result, indent=1))
    print("\n".join(md))
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
