"""Structured outputs on the real default model, through the server (greedy).

Five of the twenty schemas of tests/data/structured/schemas.json (nested objects, enums, arrays
of objects, nullable fields, a recursive $ref), streamed and not: every reply validates with
jsonschema and the two are the same text; json_object replies parse; named and required tool
calls carry arguments that validate. benchmarks/structured.py runs all twenty and measures the
per-token cost.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("llguidance")
pytest.importorskip("jsonschema")

import httpx
import jsonschema
from serve_helpers import LiveServer

from qwenlm.serve import ServeConfig

pytestmark = pytest.mark.real_model

CASES = json.loads((Path(__file__).parent / "data/structured/schemas.json").read_text())
PICKED = ["shopping", "function", "http", "tree", "event"]
SYSTEM = "Reply with one JSON object that follows this JSON schema, and nothing else:\n{schema}"


@pytest.fixture(scope="module")
def server(real_model_path):
    import qwenlm

    with LiveServer(qwenlm.load(real_model_path), ServeConfig(max_num_seqs=8)) as s:
        yield s.url


def ask(url: str, case: dict, stream: bool = False, **extra) -> dict:
    body = {
        "model": httpx.get(url + "/v1/models").json()["data"][0]["id"],
        "messages": [
            {"role": "system", "content": SYSTEM.format(schema=json.dumps(case["schema"]))},
            {"role": "user", "content": case["prompt"]},
        ],
        "temperature": 0,
        "max_tokens": 200,
        "stream": stream,
        **extra,
    }
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]
    content, reason = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                content += choice["delta"].get("content") or ""
                reason = choice["finish_reason"] or reason
    return {"message": {"content": content}, "finish_reason": reason}


def test_schemas_validate_streamed_and_not_and_json_object_parses(server):
    cases = [c for c in CASES if c["name"] in PICKED]
    jobs = [(c, stream) for c in cases for stream in (False, True)]
    fmt = lambda c: {  # noqa: E731
        "type": "json_schema",
        "json_schema": {"name": c["name"], "schema": c["schema"], "strict": True},
    }
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda j: ask(server, j[0], j[1], response_format=fmt(j[0])), jobs))
        objects = list(
            pool.map(lambda c: ask(server, c, response_format={"type": "json_object"}), cases[:2])
        )
    for (case, _), reply in zip(jobs, replies, strict=True):
        assert reply["finish_reason"] == "stop", reply
        jsonschema.validate(json.loads(reply["message"]["content"]), case["schema"])
    for plain, streamed in zip(replies[::2], replies[1::2], strict=True):
        assert plain["message"]["content"] == streamed["message"]["content"]
    for reply in objects:
        assert isinstance(json.loads(reply["message"]["content"]), dict)


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_calls_carry_valid_arguments(server, choice):
    noop = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
    for case in [c for c in CASES if c["name"] in ("weather", "order")]:
        tool = {
            "type": "function",
            "function": {"name": case["name"], "parameters": case["schema"]},
        }
        forced = {"type": "function", "function": {"name": case["name"]}}
        reply = ask(
            server,
            case,
            tools=[tool, noop],
            tool_choice=forced if choice == "named" else "required",
        )
        assert reply["finish_reason"] == "tool_calls", reply
        (call,) = reply["message"]["tool_calls"]
        schema = case["schema"] if call["function"]["name"] == case["name"] else {"type": "object"}
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
