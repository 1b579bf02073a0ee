"""Soak test: mixed traffic against a `qwenlm serve` process for a set time, on loopback.

Starts `qwenlm serve MODEL` (a random API key, a 1 MiB body limit) and runs --clients client
threads until --minutes have passed. Each client loops over a seeded random mix of: streamed
and whole chat replies, raw completions, streams the client drops after a few chunks, long
prompts (about --long-tokens tokens, capped at half the context), and bad requests of every
kind the server refuses (malformed JSON, wrong types, an unknown model or route, a form post, a
foreign Host, no key, an oversized body, a prompt over the context), each expected to get its
own status. Every request has a client-side timeout (--timeout).

Reports requests by outcome, p50 / p99 latency of the good requests per --window seconds, and
the server's resident memory (VmRSS from /proc) and open file descriptors at the start, after
each window and at the end. Exits 1 on any hung request (client timeout), any unexpected status,
or resident memory growing more than 5% over the second half of the run (bounded caches, such
as the prefix cache, fill during the first windows; a leak keeps growing).

    python benchmarks/soak.py --minutes 30                       # the default model
    python benchmarks/soak.py --model tiny.gguf --minutes 1 --window 15
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from serve import free_port, start

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "soak"
BODY_LIMIT = 1024 * 1024
MAX_GROWTH = 0.05

# kind -> weight in the mix
MIX = {"stream": 4, "chat": 3, "completion": 2, "cancel": 2, "long": 1, "bad": 3}


@dataclass
class Result:
    kind: str
    outcome: str  # ok | cancelled | refused (the expected error) | unexpected | hung | failed
    latency: float
    at: float  # seconds since the start, when it ended
    detail: str = ""


def process_stats(pid: int) -> tuple[float, int]:
    """(resident memory in MiB, open file descriptors) of process ``pid``."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Client:
    """One client thread's requests; every one ends as a :class:`Result`."""

    def __init__(
        self,
        url: str,
        key: str,
        context: int,
        long_words: int,
        args: argparse.Namespace,
        seed: int,
    ) -> None:
        self.url = url
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=args.timeout
        )
        self.rng = random.Random(seed)
        self.context = context
        self.long_words = long_words
        self.max_tokens = args.max_tokens

    def chat_body(self, words: int = 0, content: str = "", **extra: object) -> dict:
        words = words or self.rng.randint(3, 30)
        text = content or " ".join(self.rng.choice(WORDS) for _ in range(words))
        return {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": self.rng.randint(4, self.max_tokens),
            "temperature": self.rng.choice([0, 0.7, 1.0]),
            "seed": self.rng.randint(0, 1000),
            **extra,
        }

    def run(self, kind: str) -> tuple[str, str]:
        """(outcome, detail) of one request of ``kind``."""
        if kind in ("stream", "cancel", "long"):
            words = self.long_words if kind == "long" else 0
            body = self.chat_body(words, stream=True)
            keep = self.rng.randint(1, 3) if kind == "cancel" else None
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return "unexpected", f"{kind}: {r.status_code}"
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if keep is not None and len(lines) > keep:
                        return "cancelled", ""  # closing the stream drops the request
            if len(lines) < 2 or lines[-1] != "data: [DONE]" or '"error"' in lines[-2]:
                return "unexpected", f"{kind}: stream ended with {lines[-2:]}"
            return "ok", ""
        if kind == "chat":
            r = self.http.post("/v1/chat/completions", json=self.chat_body())
        elif kind == "completion":
            body = self.chat_body()
            body["prompt"] = body.pop("messages")[0]["content"]
            r = self.http.post("/v1/completions", json=body)
        else:
            return self.bad()
        return ("ok", "") if r.status_code == 200 else ("unexpected", f"{kind}: {r.status_code}")

    def bad(self) -> tuple[str, str]:
        """A request the server must refuse, with the status it must refuse it with."""
        what = self.rng.choice(sorted(BAD))
        status, send = BAD[what]
        r = send(self)
        if r.status_code != status or set(r.json().get("error", {})) != ERROR_KEYS:
            return "unexpected", f"bad {what}: {r.status_code} {r.text[:200]}"
        return "refused", what


ERROR_KEYS = {"message", "type", "param", "code"}
CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
BAD = {
    "invalid_json": (400, lambda c: c.http.post(CHAT, content=b'{"model": ', headers=JSON)),
    "wrong_type": (400, lambda c: c.http.post(CHAT, json=c.chat_body(temperature="hot"))),
    "no_messages": (400, lambda c: c.http.post(CHAT, json={"model": MODEL_NAME, "messages": []})),
    "unknown_model": (404, lambda c: c.http.post(CHAT, json={**c.chat_body(), "model": "gpt-x"})),
    "unknown_route": (404, lambda c: c.http.get("/v1/nothing")),
    "form_post": (
        415,
        lambda c: c.http.post(CHAT, content=b"a=1", headers={"Content-Type": "text/plain"}),
    ),
    "foreign_host": (403, lambda c: c.http.get("/v1/models", headers={"Host": "evil.example"})),
    "no_key": (401, lambda c: httpx.get(c.url + "/v1/models", timeout=c.http.timeout)),
    "too_large": (413, lambda c: c.http.post(CHAT, json=c.chat_body(content="x" * BODY_LIMIT))),
    "over_context": (400, lambda c: c.http.post(CHAT, json=c.chat_body(2 * c.context))),
}
WORDS = [
    "the",
    "a",
    "cache",
    "token",
    "model",
    "stream",
    "batch",
    "prefix",
    "queue",
    "server",
    "engine",
    "reply",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def watch(
    threads: list[threading.Thread],
    results: list[Result],
    lock: threading.Lock,
    began: float,
    window: float,
    pid: int,
) -> list[dict]:
    """Every ``window`` seconds while the clients run: requests finished, p50 / p99 of the
    good ones, and the server's memory and open files (printed as they come)."""
    windows: list[dict] = []
    edge = began
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        now = time.monotonic()
        if now - edge >= window or not any(t.is_alive() for t in threads):
            rss, fds = process_stats(pid)
            with lock:
                done = [r for r in results if edge - began <= r.at < now - began]
            good = [r.latency for r in done if r.outcome == "ok"]
            windows.append(
                {
                    "start_s": round(edge - began),
                    "requests": len(done),
                    "p50_s": round(percentile(good, 0.5), 3),
                    "p99_s": round(percentile(good, 0.99), 3),
                    "rss_mib": round(rss, 1),
                    "fds": fds,
                }
            )
            print(json.dumps(windows[-1]), flush=True)
            edge = now
    return windows


def wait_until_idle(url: str, seconds: float = 30.0) -> dict:
    """Until nothing runs or waits (dropped streams are reaped at the next step), or time out;
    returns the last /health answer."""
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if not (health["running"] or health["waiting"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def soak(args: argparse.Namespace) -> int:
    key = "sk-soak-" + secrets.token_hex(8)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="qwenlm-soak-")) / "server.log"
    cmd = [sys.executable, "-m", "qwenlm", "serve", *([args.model] if args.model else [])]
    cmd += ["--port", str(port), "--served-model-name", MODEL_NAME, "--no-access-log"]
    cmd += ["--api-key", key, "--max-body-bytes", str(BODY_LIMIT)]
    proc = start(cmd, url, {"Authorization": f"Bearer {key}"}, log)
    results: list[Result] = []
    windows: list[dict] = []
    try:
        auth = {"Authorization": f"Bearer {key}"}
        models = httpx.get(url + "/v1/models", headers=auth)
        context = models.json()["data"][0]["max_model_len"]
        # Long prompts: about --long-tokens tokens (at most half the context), in words of
        # this tokenizer.
        probe = {"model": MODEL_NAME, "prompt": " ".join(WORDS * 10), "max_tokens": 1}
        r = httpx.post(url + "/v1/completions", json=probe, headers=auth, timeout=args.timeout)
        per_word = r.json()["usage"]["prompt_tokens"] / (len(WORDS) * 10)
        long_words = int(min(args.long_tokens, context // 2) / per_word)
        start_rss, start_fds = process_stats(proc.pid)
        began = time.monotonic()
        stop_at = began + args.minutes * 60
        lock = threading.Lock()

        def client(i: int) -> None:
            c = Client(url, key, context, long_words, args, args.seed + i)
            kinds, weights = list(MIX), list(MIX.values())
            while time.monotonic() < stop_at:
                kind = c.rng.choices(kinds, weights)[0]
                t0 = time.monotonic()
                try:
                    outcome, detail = c.run(kind)
                except httpx.TimeoutException:
                    outcome, detail = "hung", f"{kind}: no answer within {args.timeout} s"
                except httpx.HTTPError as e:
                    outcome, detail = "failed", f"{kind}: {type(e).__name__}: {e}"
                t1 = time.monotonic()
                with lock:
                    results.append(Result(kind, outcome, t1 - t0, t1 - began, detail))
            c.http.close()

        threads = [
            threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        windows = watch(threads, results, lock, began, args.window, proc.pid)
        for t in threads:
            t.join(args.timeout + 10)
        health = wait_until_idle(url)
        end_rss, end_fds = process_stats(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    outcomes = Counter(r.outcome for r in results)
    by_kind = Counter(
        f"{r.kind}:{r.detail if r.outcome == 'refused' else r.outcome}" for r in results
    )
    problems = [r.detail for r in results if r.outcome in ("unexpected", "hung", "failed")]
    # A leak grows for as long as traffic runs; bounded caches fill once. The server's prefix
    # cache (16,384 tokens: ~400 MB of key/value for the 0.5B model) and the allocator's pools
    # fill during the first windows, so growth is judged over the second half of the run.
    growth = growth_first = 0.0
    if windows:
        growth = windows[-1]["rss_mib"] / windows[len(windows) // 2]["rss_mib"] - 1
        growth_first = windows[-1]["rss_mib"] / windows[0]["rss_mib"] - 1
    report = {
        "model": args.model or "default",
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": len(results),
        "outcomes": dict(outcomes),
        "by_kind": dict(sorted(by_kind.items())),
        "windows": windows,
        "rss_mib": {"start": round(start_rss, 1), "end": round(end_rss, 1)},
        "fds": {"start": start_fds, "end": end_fds},
        "rss_growth_second_half": round(growth, 4),
        "rss_growth_first_to_last_window": round(growth_first, 4),
        "idle_at_end": health,
        "problems": problems[:20],
        "server_log": str(log),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        (out / "soak.json" if out.is_dir() else out).write_text(text + "\n")
    failed = []
    if outcomes["hung"]:
        failed.append(f"{outcomes['hung']} hung requests")
    if outcomes["unexpected"] or outcomes["failed"]:
        failed.append(f"{outcomes['unexpected'] + outcomes['failed']} unexpected answers")
    if growth > MAX_GROWTH:
        failed.append(f"resident memory grew {growth:.1%} over the second half of the run")
    if health.get("running") or health.get("waiting"):
        failed.append(f"requests left running after the soak: {health}")
    for f in failed:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model to serve (default: the default model)")
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--window", type=float, default=300.0, help="report window, s (default 300)")
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout, s (default 300)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest reply (default 64)")
    p.add_argument("--long-tokens", type=int, default=2000, help="long prompts (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON report here (a folder: soak.json in it)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64 or args.minutes <= 0:
        p.error("--clients must be 1..64 and --minutes positive")
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
