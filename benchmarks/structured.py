"""Structured outputs: validity on the real model, the per-token cost of constraining, and the
comparison of constrained-decoding libraries that chose llguidance.

    python benchmarks/structured.py               # validity (20 schemas, via the server) + slowdown
    python benchmarks/structured.py --libraries   # xgrammar vs llguidance vs outlines-core

Validity: the 20 prompts and schemas of tests/data/structured/schemas.json go through an
in-process `qwenlm serve` with ``response_format: json_schema`` (strict), greedy, streamed and
not; every reply must validate (jsonschema). Also ``json_object`` for each prompt, and named and
``required`` tool calls. Slowdown: each prompt is generated constrained (greedy) and then
unconstrained for as many tokens (``ignore_eos``); the time per token after the first is
compared, and the median ratio over the prompts reported (target: under 10% slower).

Libraries: each library's vocabulary is built from our tokenizer (token bytes through
``Tokenizer.id_to_bytes``), each schema compiled (time per schema), the example document of
each schema fed token by token (time to compute the allowed-token mask, and every token of the
example must be allowed), then random walks that pick short tokens among the allowed ones
must end in JSON that validates. Needs ``pip install xgrammar outlines-core``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CASES = json.loads((ROOT / "tests/data/structured/schemas.json").read_text())
SYSTEM = "Reply with one JSON object that follows this JSON schema, and nothing else:\n{schema}"


# -- validity and slowdown on the real model ---------------------------------------------------
def messages(case: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM.format(schema=json.dumps(case["schema"]))},
        {"role": "user", "content": case["prompt"]},
    ]


class Server:
    """`qwenlm serve` in this process (uvicorn on a thread), for the validity checks."""

    def __init__(self, model: Any) -> None:
        import uvicorn

        from qwenlm.serve import ServeConfig, create_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(model, ServeConfig(model_names=["m"], max_num_seqs=8))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    if not body.get("stream"):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
        r.raise_for_status()
        return r.json()["choices"][0]
    content, calls, reason = "", [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                content += choice["delta"].get("content") or ""
                calls += choice["delta"].get("tool_calls") or []
                reason = choice["finish_reason"] or reason
    message = {"content": content, "tool_calls": calls or None}
    return {"message": message, "finish_reason": reason}


def validity(model: Any, max_tokens: int) -> dict[str, Any]:
    import jsonschema

    server = Server(model)
    jobs = []
    for case in CASES:
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True},
        }
        for stream in (False, True):
            jobs.append(("json_schema", case, stream, {"response_format": fmt}))
        jobs.append(("json_object", case, False, {"response_format": {"type": "json_object"}}))
    for case in CASES[:5]:
        tool = {
            "type": "function",
            "function": {"name": case["name"], "parameters": case["schema"]},
        }
        other = {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        }
        named = {"type": "function", "function": {"name": case["name"]}}
        jobs.append(("named tool", case, False, {"tools": [tool, other], "tool_choice": named}))
        jobs.append(
            ("required tool", case, True, {"tools": [tool, other], "tool_choice": "required"})
        )

    def run(job: tuple) -> tuple[str, str, bool, str]:
        kind, case, stream, extra = job
        body = {
            "model": "m",
            "messages": messages(case),
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": stream,
            **extra,
        }
        choice = post(server.url, body)
        try:
            if kind.endswith("tool"):
                (call,) = choice["message"]["tool_calls"]
                fn = call["function"]
                value = json.loads(fn["arguments"])
                schema = case["schema"] if fn["name"] == case["name"] else {"type": "object"}
            else:
                value = json.loads(choice["message"]["content"])
                schema = case["schema"] if kind == "json_schema" else {"type": "object"}
            jsonschema.validate(value, schema)
            return kind, case["name"], True, ""
        except Exception as e:  # report every failure, keep going
            return (
                kind,
                case["name"],
                False,
                f"{type(e).__name__}: {str(e)[:100]} | {json.dumps(choice)[:300]}",
            )

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, jobs))
    finally:
        server.close()
    summary: dict[str, Any] = {}
    for kind, _, ok, _ in results:
        k = summary.setdefault(kind, {"valid": 0, "total": 0})
        k["total"] += 1
        k["valid"] += ok
    summary["failures"] = [f"{k} {n}: {why}" for k, n, ok, why in results if not ok]
    return summary


def per_token_seconds(model: Any, prompt: list[int], **options: Any) -> tuple[float, int]:
    """Seconds per token after the first, and the tokens generated (greedy)."""
    stamps = []
    tokens = 0
    for chunk in model.generate_chunks(prompt, temperature=0, **options):
        stamps.append(time.perf_counter())
        tokens = chunk.completion_tokens or tokens + len(chunk.token_ids)
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), tokens


def slowdown(model: Any, max_tokens: int) -> dict[str, Any]:
    from qwenlm.generation.constrained import json_processor

    json_processor(model.tokenizer, None)  # build the vocabulary outside the timings
    ratios, rows = [], []
    for case in CASES:
        prompt = model.encode_chat(messages(case))
        proc = json_processor(model.tokenizer, case["schema"])
        constrained, n = per_token_seconds(
            model, prompt, max_new_tokens=max_tokens, logits_processors=(proc,)
        )
        plain, _ = per_token_seconds(model, prompt, max_new_tokens=n, ignore_eos=True)
        ratios.append(constrained / plain)
        rows.append(
            {
                "name": case["name"],
                "tokens": n,
                "constrained_ms": round(constrained * 1e3, 2),
                "plain_ms": round(plain * 1e3, 2),
            }
        )
    return {
        "median_slowdown_percent": round(100 * (statistics.median(ratios) - 1), 1),
        "per_prompt": rows,
    }


# -- the library comparison --------------------------------------------------------------------
def vocabulary() -> tuple[Any, int]:
    from qwenlm import registry
    from qwenlm.weights import open_checkpoint

    ckpt = open_checkpoint(registry.pull(registry.DEFAULT_MODEL, progress=False))
    return ckpt.tokenizer, ckpt.config.vocab_size


class XGrammar:
    def __init__(self, tok: Any, n: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        # Special tokens as empty strings: xgrammar never emits those; stops are named.
        vocab = [b"" if tok.is_special(i) else tok.id_to_bytes(i) for i in range(n)]
        info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=n, stop_token_ids=list(tok.stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": "), strict_mode=True
        )

    def matcher(self, grammar: Any) -> Any:
        m = self.xgr.GrammarMatcher(grammar)
        return m.fill_next_token_bitmask, m.accept_token

    @staticmethod
    def fill(fill: Any, bitmask: Any) -> None:
        fill(bitmask[None])


class LLGuidance:
    def __init__(self, tok: Any, n: int) -> None:
        from qwenlm.generation import constrained

        self.compiler = constrained._Compiler(tok)

    def compile(self, schema: dict) -> Any:
        from qwenlm.generation.constrained import Grammar

        return self.compiler.matcher(Grammar.json(schema))  # builds the parser: the compile

    def matcher(self, compiled: Any) -> Any:
        m = compiled.deep_copy()
        return (
            lambda bm: m.unsafe_compute_mask_ptr(bm.data_ptr(), bm.numel() * 4)
        ), m.consume_token

    @staticmethod
    def fill(fill: Any, bitmask: Any) -> None:
        fill(bitmask)


class OutlinesCore:
    def __init__(self, tok: Any, n: int) -> None:
        import outlines_core

        self.oc = outlines_core
        table: dict[bytes, list[int]] = {}
        for i in range(n):
            b = tok.id_to_bytes(i)
            if b and not tok.is_special(i):
                table.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.stop_token_ids[0], table)

    def compile(self, schema: dict) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, index: Any) -> Any:
        guide = self.oc.Guide(index)

        def accept(t: int) -> bool:
            try:
                guide.advance(t, return_tokens=False)
                return True
            except ValueError:
                return False

        return (lambda bm: guide.write_mask_into(bm.data_ptr(), bm.numel(), 4)), accept

    @staticmethod
    def fill(fill: Any, bitmask: Any) -> None:
        fill(bitmask)


LIBRARIES = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}


def compare(name: str, walks: int, max_walk: int) -> dict[str, Any]:
    import jsonschema
    import torch

    tok, n = vocabulary()
    start = time.perf_counter()
    lib = LIBRARIES[name](tok, n)
    setup = time.perf_counter() - start
    bitmask = torch.zeros((n + 31) // 32, dtype=torch.int32)
    stops = set(tok.stop_token_ids)
    rng = np.random.default_rng(0)
    # Random walks prefer short tokens and closing quotes / brackets, so documents end.
    lengths = [len(tok.id_to_bytes(i)) for i in range(n)]
    closing = [bool(b) and set(b) <= set(b'"]}') for b in map(tok.id_to_bytes, range(n))]
    score = np.array(
        [-3.0 * k + 4.0 * c if k else -1e9 for k, c in zip(lengths, closing, strict=True)]
    )

    def allowed() -> np.ndarray:
        return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:n].astype(bool)

    compile_s, mask_us, failures, valid, invalid, unfinished = [], [], [], 0, 0, 0
    for case in CASES:
        try:
            t = time.perf_counter()
            grammar = lib.compile(case["schema"])
            compile_s.append(time.perf_counter() - t)
        except Exception as e:
            failures.append(f"{case['name']}: compile: {str(e)[:80]}")
            continue
        fill, accept = lib.matcher(grammar)
        ids = [*tok.encode(json.dumps(case["example"], ensure_ascii=False)), tok.stop_token_ids[0]]
        for t in ids:
            t0 = time.perf_counter()
            lib.fill(fill, bitmask)
            mask_us.append((time.perf_counter() - t0) * 1e6)
            if not allowed()[t] or not accept(t):
                failures.append(
                    f"{case['name']}: the example's token {tok.id_to_bytes(t)!r} refused"
                )
                break
        for _ in range(walks):
            fill, accept = lib.matcher(grammar)
            out: list[int] = []
            for _ in range(max_walk):
                lib.fill(fill, bitmask)
                t = int(np.where(allowed(), score + rng.gumbel(size=n), -np.inf).argmax())
                if t in stops:
                    break
                if not accept(t):
                    failures.append(f"{case['name']}: a walk's token refused")
                    break
                out.append(t)
            else:
                unfinished += 1
                continue
            try:
                jsonschema.validate(json.loads(tok.decode(out)), case["schema"])
                valid += 1
            except Exception as e:
                invalid += 1
                failures.append(
                    f"{case['name']}: invalid walk {tok.decode(out)[:80]!r}: {str(e)[:60]}"
                )
    return {
        "library": name,
        "vocabulary_s": round(setup, 2),
        "compile_ms_median": round(1e3 * statistics.median(compile_s), 1) if compile_s else None,
        "compile_ms_max": round(1e3 * max(compile_s), 1) if compile_s else None,
        "mask_us_median": round(statistics.median(mask_us)),
        "mask_us_p90": round(float(np.percentile(mask_us, 90))),
        "walks_valid": valid,
        "walks_invalid": invalid,
        "walks_unfinished": unfinished,
        "failures": failures,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--libraries", action="store_true", help="compare the constrained-decoding libraries"
    )
    p.add_argument("--walks", type=int, default=3, help="random walks per schema (--libraries)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per reply at most")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/structured.json"))
    args = p.parse_args()
    if args.libraries:
        result: dict[str, Any] = {"libraries": []}
        for name in LIBRARIES:
            try:
                result["libraries"].append(compare(name, args.walks, 400))
            except ImportError as e:
                result["libraries"].append({"library": name, "skipped": str(e)})
            print(json.dumps(result["libraries"][-1]), flush=True)
        out = Path(args.out).with_name("structured_libraries.json")
    else:
        import qwenlm

        model = qwenlm.load()
        result = {"validity": validity(model, args.max_tokens)}
        print(json.dumps(result["validity"], indent=1), flush=True)
        result["slowdown"] = slowdown(model, args.max_tokens)
        print(json.dumps(result["slowdown"], indent=1), flush=True)
        out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
