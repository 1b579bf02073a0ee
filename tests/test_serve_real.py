"""`qwenlm serve` on the real default model, driven by the official `openai` client, a raw SSE
reader, many concurrent clients, and headless Chromium on the web page.

One server process (the real CLI, int8 on the CPU) serves the whole module on a loopback port.
Replies are greedy unless a test is about sampling, so the expected texts are stable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import httpx
import openai
from serve_helpers import served_process

pytestmark = pytest.mark.real_model

KEY = "sk-real-test-0123456789"
MODEL = "qwen2.5-coder-0.5b-instruct"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(real_model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [str(real_model_path), "--served-model-name", MODEL, "--max-num-seqs", "16"]
    with served_process([*args, "--max-queue", "64"], log, key=KEY) as url:
        yield url
    text = log.read_text(errors="replace")
    # Nothing leaks into the log: no tracebacks, no key.
    assert "Traceback" not in text and KEY not in text, text[-3000:]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


GREEDY = {"temperature": 0}


# -- one numeric path --------------------------------------------------------------------------
SURFACE_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    # ~700 tokens: the prompt crosses a prefill piece boundary (512)
    "Summarize this code in one sentence:\n"
    + "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(60)),
]


def test_every_surface_gives_the_same_tokens(server, real_model_path):
    """`qwenlm generate`, the Python API and the server (alone, and beside 7 other streams)."""
    import qwenlm

    api = qwenlm.load(real_model_path)
    n = 24
    for prompt in SURFACE_PROMPTS:
        cli = subprocess.run(
            [sys.executable, "-m", "qwenlm", "generate", "-m", str(real_model_path), "-",
             "--greedy", "--max-new-tokens", str(n)],
            input=prompt, capture_output=True, text=True, cwd=ROOT, timeout=600, check=True,
        ).stdout.removesuffix("\n")  # fmt: skip
        python = "".join(
            c.text for c in api.chat_chunks(ask(prompt), max_new_tokens=n, temperature=0)
        )
        body = {"model": MODEL, "messages": ask(prompt), "max_tokens": n, **GREEDY}
        alone = httpx.post(server + "/v1/chat/completions", json=body, headers=auth(), timeout=600)
        stop = threading.Event()

        def noise(i: int, stop: threading.Event = stop) -> None:
            req = {"model": MODEL, "messages": ask(f"Count from {i} to 500."), "stream": True,
                   "max_tokens": 120}  # fmt: skip
            with httpx.stream("POST", server + "/v1/chat/completions", json=req,
                              headers=auth(), timeout=600) as r:  # fmt: skip
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

        others = [threading.Thread(target=noise, args=(i,)) for i in range(7)]
        for t in others:
            t.start()
        time.sleep(2)
        busy = httpx.post(server + "/v1/chat/completions", json=body, headers=auth(), timeout=600)
        stop.set()
        for t in others:
            t.join(600)
        texts = [r.json()["choices"][0]["message"]["content"] for r in (alone, busy)]
        assert cli == python == texts[0] == texts[1], (cli, python, texts)


# -- the OpenAI client -------------------------------------------------------------------------
def test_chat_and_usage(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ask("What is 2+2? Answer briefly."), max_tokens=30, **GREEDY
    )
    assert r.model == MODEL and r.object == "chat.completion"
    choice = r.choices[0]
    assert "4" in choice.message.content and choice.finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 30
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert [m.id for m in client.models.list()] == [MODEL]


def test_seeded_sampling_is_reproducible_and_streaming_gives_the_same_text(client):
    req = dict(
        model=MODEL,
        messages=ask("Write a short poem about the sea."),
        max_tokens=40,
        temperature=0.9,
        seed=1234,
    )
    first = client.chat.completions.create(**req).choices[0].message.content
    again = client.chat.completions.create(**req).choices[0].message.content
    assert first == again and len(first) > 20
    stream = client.chat.completions.create(**req, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == first


def test_stop_strings_are_never_emitted(client):
    req = dict(
        model=MODEL,
        messages=ask("Count from 1 to 10, separated by commas."),
        max_tokens=60,
        stop=["5", "never-seen"],
        **GREEDY,
    )
    r = client.chat.completions.create(**req)
    text = r.choices[0].message.content
    assert text.startswith("1") and "4" in text and "5" not in text
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**req, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_length_finish(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Name a color."), n=3, max_tokens=5, temperature=1.0, seed=5
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens <= 15
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Write a long story."), max_tokens=5, **GREEDY
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("Say hello."),
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        extra_body={"repetition_penalty": 1.0},
        **GREEDY,
    )
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token  # greedy picks the likeliest
        # the same float through JSON: approx's default 1e-6
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token


def test_completions_endpoint(client):
    r = client.completions.create(
        model=MODEL, prompt="def add(a, b):\n", max_tokens=16, stop=["\n\n"], **GREEDY
    )
    assert "return" in r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")


# -- Ollama's API and embeddings, through their clients ------------------------------------------
def test_the_ollama_client_chats_generates_lists_shows_and_embeds(server, client):
    ollama = pytest.importorskip("ollama")
    api = ollama.Client(host=server, headers=auth(), timeout=300)
    greedy = {"temperature": 0, "num_predict": 8}
    hello = ask("Say hello.")
    # Ollama's own name for the model, as its users write it
    whole = api.chat(model="qwen2.5-coder:0.5b", messages=hello, options=greedy)
    assert whole.done and whole.message.content and whole.eval_count <= 8
    parts = list(api.chat(model=MODEL, messages=hello, options=greedy, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    openai_reply = client.chat.completions.create(
        model=MODEL, messages=hello, max_tokens=8, **GREEDY
    )
    assert openai_reply.choices[0].message.content == whole.message.content  # one engine
    gen = api.generate(model=MODEL, prompt="Write a Python add function.", options=greedy)
    streamed = api.generate(
        model=MODEL, prompt="Write a Python add function.", options=greedy, stream=True
    )
    assert "".join(p.response for p in streamed) == gen.response and gen.response
    # fill-in-the-middle through `suffix`, with Qwen2.5-Coder's FIM tokens
    fim = api.generate(
        model=MODEL,
        prompt="def add(a, b):\n    ",
        suffix="\n\nprint(add(1, 2))\n",
        options={"temperature": 0, "num_predict": 16},
    )
    assert "a + b" in fim.response
    assert [m.model for m in api.list().models] == [MODEL]
    shown = api.show(MODEL)
    assert shown.modelinfo["qwen2.context_length"] == 32768
    assert {"completion", "tools", "insert"} <= set(shown.capabilities)
    assert shown.details.parameter_size.endswith("M")
    (running,) = api.ps().models
    assert running.context_length == 32768
    vectors = api.embed(model=MODEL, input=["hello", "world"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 896


PARAPHRASES = [
    ("How do I reverse a list in Python?", "What is the way to reverse a Python list?"),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("Open the file and read every line.", "Read all lines from the file after opening it."),
    ("The weather is cold and rainy today.", "Today it is raining and chilly."),
    ("She bought three apples at the market.", "At the market she purchased three apples."),
    ("The server returned a 404 error.", "The server responded with a not-found error."),
]
UNRELATED = [
    ("How do I reverse a list in Python?", "The cat is sleeping on the sofa."),
    ("The weather is cold and rainy today.", "Open the file and read every line."),
    ("She bought three apples at the market.", "The server returned a 404 error."),
    ("A cat naps on the couch.", "What is the way to reverse a Python list?"),
    ("Today it is raining and chilly.", "At the market she purchased three apples."),
    (
        "Read all lines from the file after opening it.",
        "The server responded with a not-found error.",
    ),
]


def test_embeddings_rank_paraphrases_above_unrelated_pairs(client):
    texts = sorted({t for pair in PARAPHRASES + UNRELATED for t in pair})
    got = client.embeddings.create(model=MODEL, input=texts)  # base64 on the wire
    vec = {t: d.embedding for t, d in zip(texts, got.data, strict=True)}
    assert got.usage.prompt_tokens > len(texts)
    for v in vec.values():
        assert abs(sum(x * x for x in v) - 1) < 1e-5 and len(v) == 896
    again = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.embedding for d in again.data] == [vec[t] for t in texts]  # deterministic
    alone = client.embeddings.create(model=MODEL, input=texts[3]).data[0].embedding
    assert alone == vec[texts[3]]  # a batch gives each text what it gets alone

    def cos(a: str, b: str) -> float:
        return sum(x * y for x, y in zip(vec[a], vec[b], strict=True))

    para = [cos(a, b) for a, b in PARAPHRASES]
    other = [cos(a, b) for a, b in UNRELATED]
    print("paraphrase cosines", [round(x, 3) for x in para])  # shown with -rA
    print("unrelated cosines", [round(x, 3) for x in other])
    assert sum(para) / len(para) > sum(other) / len(other) + 0.2
    assert min(para) > max(other)


def test_raw_sse_stream(server):
    body = {
        "model": MODEL,
        "messages": ask("Say hi."),
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
        **GREEDY,
    }
    lines = []
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json=body, headers=auth(), timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: ")
            lines.append(block[6:])
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] >= 1 and text


CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 2 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}


def test_tool_call_round_trip(client):
    messages = ask("What is 1234 * 5678? Use the calculator.")
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[CALCULATOR], max_tokens=100, **GREEDY
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert call.id.startswith("call_")
    expression = json.loads(call.function.arguments)["expression"]
    assert "1234" in expression and "5678" in expression
    # Streaming gives the same call as a tool-call delta.
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[CALCULATOR],
            max_tokens=100,
            stream=True,
            **GREEDY,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 1 and deltas[0].function.name == "calculator"
    assert json.loads(deltas[0].function.arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The result goes back as a `tool` message. (This 0.5B model tends to call the tool again
    # on its own; a nudge in the next user turn makes it answer, as the agent does.)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "7006652"},
        {
            "role": "user",
            "content": "Using the tool results above, answer my request in plain text now.",
        },
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[CALCULATOR], max_tokens=60, **GREEDY
    )
    assert r.choices[0].finish_reason == "stop"
    assert "7006652" in r.choices[0].message.content.replace(",", "")


# -- errors ------------------------------------------------------------------------------------
def test_errors_through_the_openai_client(client, server):
    def fails(exc, status, **kwargs):
        with pytest.raises(exc) as e:
            client.chat.completions.create(**{"model": MODEL, "messages": ask("hi"), **kwargs})
        assert e.value.status_code == status
        body = e.value.body
        assert set(body) >= {"message", "type", "param", "code"}, body
        return body

    assert fails(openai.BadRequestError, 400, temperature=3)["param"] == "temperature"
    assert fails(openai.BadRequestError, 400, extra_body={"temperature": "hot"})["code"] == (
        "invalid_type"
    )
    assert fails(openai.BadRequestError, 400, messages=[])["param"] == "messages"
    role = fails(openai.BadRequestError, 400, messages=[{"role": "wizard", "content": "x"}])
    assert role["param"] == "messages[0].role"
    assert fails(openai.BadRequestError, 400, stop=["a", "b", "c", "d", "e"])["param"] == "stop"
    long = fails(openai.BadRequestError, 400, messages=ask("hello " * 33000))
    assert long["code"] == "context_length_exceeded"
    assert "maximum context length is 32768 tokens" in long["message"]
    over = fails(openai.APIStatusError, 413, messages=ask("x" * (5 * 1024 * 1024)))
    assert over["code"] == "request_too_large"
    assert fails(openai.NotFoundError, 404, model="gpt-4o")["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=ask("hi"))
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"model": "x", "messages": [', 400),  # malformed JSON
        (b'["not", "an", "object"]', 400),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400),
        (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "seed": Infinity}', 400),
        (b'{"model": "M", "messages": [{"role": "user", "content": "\\udc80 lone"}]}', 400),
        (b'{"model": "M", "messages": [{"role": "user", "content": 12}]}', 400),
    ],
)
def test_errors_for_raw_bodies(server, raw, status):
    raw = raw.replace(b'"M"', json.dumps(MODEL).encode())
    r = httpx.post(
        server + "/v1/chat/completions",
        content=raw,
        headers={**auth(), "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server + "/v1/chat/completions", content=raw, timeout=60)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- many clients ------------------------------------------------------------------------------
PROMPTS = [
    "Name three fruits.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a variable is in one sentence.",
]


def test_16_concurrent_streams_finish_correctly_while_health_answers(
    client, server, record_property
):
    req = dict(model=MODEL, max_tokens=24, **GREEDY)
    expected = [
        client.chat.completions.create(messages=ask(p), **req).choices[0].message.content
        for p in PROMPTS
    ]
    results: dict[int, str] = {}
    health: list[float] = []
    done = threading.Event()

    def stream(i: int) -> None:
        chunks = client.chat.completions.create(messages=ask(PROMPTS[i % 4]), stream=True, **req)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def probe() -> None:
        with httpx.Client(headers=auth(), timeout=30) as h:
            while not done.is_set():
                t = time.monotonic()
                assert h.get(server + "/health").status_code == 200
                health.append(time.monotonic() - t)
                time.sleep(0.2)

    prober = threading.Thread(target=probe)
    prober.start()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    done.set()
    prober.join(60)
    assert len(results) == 16
    for i in range(16):
        assert results[i] == expected[i % 4], i
    record_property("health_probes", len(health))
    record_property("health_max_s", round(max(health), 3))
    assert len(health) >= 5 and max(health) < 1.0, health


KILLED_CLIENTS = textwrap.dedent(
    """
    import json, socket, sys, time
    port, key, model, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    socks = []
    for i in range(count):
        ask = [{"role": "user", "content": f"Tell me a long story, part {i}."}]
        body = json.dumps({"model": model, "stream": True, "max_tokens": 400, "messages": ask})
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n"
                   f"Authorization: Bearer {key}\\r\\nContent-Type: application/json\\r\\n"
                   f"Content-Length: {len(body)}\\r\\n\\r\\n{body}").encode())
        socks.append(s)
    seen = [b""] * count
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for i, s in enumerate(socks):
            s.settimeout(0.01)
            try:
                seen[i] += s.recv(65536)
            except (TimeoutError, BlockingIOError):
                pass
        # every client has its stream open; the running ones are mid-way through their text
        texts = sum(b'"content": "' in x.replace(b'"content": ""', b"") for x in seen)
        if all(b"data:" in x for x in seen) and texts >= 16:
            break
    print("READY", flush=True)
    time.sleep(600)
    """
)


def test_50_killed_streams_leave_the_server_idle(server, client, record_property):
    port = int(server.rsplit(":", 1)[1])
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENTS, str(port), KEY, MODEL, "50"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        busy = httpx.get(server + "/health", headers=auth()).json()
        record_property("busy_before_kill", busy)
        assert busy["running"] + busy["waiting"] >= 45  # (a story may have ended early)
    finally:
        proc.kill()  # SIGKILL: the sockets close without a goodbye
        proc.wait()
    killed = time.monotonic()
    while True:
        h = httpx.get(server + "/health", headers=auth()).json()
        if h["running"] == 0 and h["waiting"] == 0:
            record_property("idle_after_kill_s", round(time.monotonic() - killed, 3))
            break
        assert time.monotonic() - killed < 2.0, h
        time.sleep(0.05)
    r = client.chat.completions.create(
        model=MODEL, messages=ask("What is 2+2? Answer briefly."), max_tokens=30, **GREEDY
    )
    assert "4" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


# -- the web page in headless Chromium ---------------------------------------------------------
def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium not found: apt-get install -y chromium (scripts/test.sh does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        # The page's own login: the browser's Basic prompt, with the API key as the password.
        context = browser.new_context(http_credentials={"username": "me", "password": KEY})
        page = context.new_page()
        page.dialogs = []
        page.requests = []
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: page.requests.append((r.url, r.post_data)))
        page.goto(server + "/")
        page.wait_for_selector("body[data-ready=true]")
        page.click("#toggle-settings")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "200")
        yield page
        browser.close()


def last_reply(page):
    return page.locator(".msg.assistant").last


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_page_streams_a_reply_with_highlighted_code(page):
    assert page.inner_text("#model-name") == MODEL
    send(page, "Write a Python function is_prime(n). Only the code.")
    reply = last_reply(page)
    lengths = []
    deadline = time.monotonic() + 300
    while reply.get_attribute("data-done") is None and time.monotonic() < deadline:
        lengths.append(len(reply.locator(".body").inner_text()))
        time.sleep(0.1)
    assert reply.get_attribute("data-done") == "finished"
    grew = sorted({n for n in lengths if n > 0})
    assert len(grew) >= 3, "the reply did not stream in"
    code = reply.locator("pre code")
    assert "def is_prime" in code.first.inner_text()
    assert reply.locator("pre code .tok-kw").count() > 0
    assert reply.locator("pre .copy").count() >= 1


def test_page_keeps_the_conversation(page):
    send(page, "Now rename it to check_prime.")
    reply = last_reply(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.msg.assistant')].at(-1).dataset.done",
        timeout=300_000,
    )
    posts = [json.loads(d) for u, d in page.requests if u.endswith("/chat/completions") and d]
    assert [m["role"] for m in posts[-1]["messages"]] == ["user", "assistant", "user"]
    assert posts[-1]["temperature"] == 0 and posts[-1]["stream"] is True
    assert reply.get_attribute("data-done") == "finished"


def test_page_stop_button_stops_the_reply(page, server):
    page.click("#new-chat")
    send(page, "Write a very long essay about the history of computers.")
    reply = last_reply(page)
    page.wait_for_function(
        "() => ([...document.querySelectorAll('.msg.assistant')].at(-1)"
        ".querySelector('.body').innerText || '').length > 40",
        timeout=300_000,
    )
    page.click("#stop")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.msg.assistant')].at(-1).dataset.done === 'stopped'"
    )
    stopped = reply.locator(".body").inner_text()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    deadline = time.monotonic() + 2
    while httpx.get(server + "/health", headers=auth()).json()["running"]:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.05)
    time.sleep(0.5)
    assert reply.locator(".body").inner_text() == stopped


def test_page_shows_html_and_script_in_replies_as_text(page):
    page.click("#new-chat")
    payload = "<img src=x onerror=alert(1)> <script>alert(2)</script>"
    send(page, f"Reply with exactly this text and nothing else: {payload}")
    reply = last_reply(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.msg.assistant')].at(-1).dataset.done",
        timeout=300_000,
    )
    assert payload in reply.inner_text()
    assert page.locator("#messages img").count() == 0
    assert page.locator("#messages script").count() == 0
    # The renderer itself, on hostile markdown: still only text.
    nodes = page.evaluate(
        """() => {
            const el = window.qwenlmRenderMarkdown(
              '**<img src=x onerror=alert(3)>** `<script>alert(4)</script>`\\n' +
              '```html\\n<iframe src=javascript:alert(5)></iframe>\\n```');
            document.getElementById('messages').appendChild(el);
            return el.querySelectorAll('img, script, iframe').length;
        }"""
    )
    assert nodes == 0
    time.sleep(0.5)
    assert page.dialogs == []
    assert not [u for u, _ in page.requests if u.rstrip("/").endswith("/x")]
