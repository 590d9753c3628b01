"""A reasoning model's thinking, read by the official clients through the hub.

llama.cpp, vLLM and LM Studio send a reasoning model's thinking as `reasoning_content`
beside the answer. The tiny real model of the other tests does not think, so a second
provider joins the same hub in front of a small scripted backend that does (a fake in
addition to the real parts: the hub, the agent and the clients are real). The
`anthropic` client must read it as `thinking` blocks when it turns thinking on, and the
`openai` client's Responses API as a `reasoning` item, whole and streamed, and the
`ollama` client as `thinking`, unless it asked `think=False`.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import ollama
import openai
import pytest

from test_openai_client import BIN, cli, served_models, stack, start, wait_for  # noqa: F401

REASONER = "reasoner"
THOUGHTS = ["Two plus two", " is four."]
ANSWER = "4"


def chunk(delta, finish=None):
    return {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": REASONER,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}


class Reasoner(BaseHTTPRequestHandler):
    """An OpenAI-compatible backend whose one model thinks before it answers."""

    def log_message(self, *args):
        pass

    def send_json(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/v1/models"):
            self.send_json(200, {"object": "list", "data": [{"id": REASONER, "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": "not here"}})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        req = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.endswith("/v1/chat/completions"):
            return self.send_json(404, {"error": {"message": "not here"}})
        if not req.get("stream"):
            message = {"role": "assistant", "content": ANSWER, "reasoning_content": "".join(THOUGHTS)}
            return self.send_json(200, {
                "id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": REASONER,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": USAGE})
        events = [chunk({"role": "assistant"})]
        events += [chunk({"reasoning_content": t}) for t in THOUGHTS]
        events += [chunk({"content": ANSWER}), chunk({}, "stop")]
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk({}), "choices": [], "usage": USAGE})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for e in events:
            self.wfile.write(f"data: {json.dumps(e)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


@pytest.fixture(scope="module")
def reasoner(stack):  # noqa: F811
    server = ThreadingHTTPServer(("127.0.0.1", 0), Reasoner)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = f"http://127.0.0.1:{server.server_address[1]}/v1"
    token = cli("providers", "create", "--name", "pytest-reasoner", *stack.admin)
    procs = {}
    start(procs, stack.tmp, "reasoner-agent",
          [BIN, "provide", "--hub", stack.hub, "--token", token, "--backend", backend,
           "--state-dir", str(stack.tmp / "reasoner-agent-state")])
    try:
        wait_for(f"{REASONER} in /v1/models", lambda: REASONER in served_models(stack.base_url, stack.key),
                 procs, time.monotonic() + 60)
        yield stack
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=10)
        server.shutdown()


def ask(**kw):
    return dict(model=REASONER, max_tokens=64, messages=[{"role": "user", "content": "What is 2+2?"}], **kw)


def test_anthropic_thinking_blocks(reasoner):
    claude = anthropic.Anthropic(base_url=reasoner.hub, api_key=reasoner.key, max_retries=0, timeout=60)
    on = {"type": "enabled", "budget_tokens": 1024}
    m = claude.messages.create(**ask(thinking=on))
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "".join(THOUGHTS) and m.content[1].text == ANSWER
    with claude.messages.stream(**ask(thinking=on)) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "thinking" in kinds, kinds  # the SDK's own event for a thinking_delta
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "".join(THOUGHTS) and final.content[1].text == ANSWER
    quiet = claude.messages.create(**ask())
    assert [b.type for b in quiet.content] == ["text"], "no thinking unless asked for"


def test_responses_reasoning_item(reasoner):
    client = openai.OpenAI(base_url=reasoner.base_url, api_key=reasoner.key, max_retries=0, timeout=60)
    r = client.responses.create(model=REASONER, input="What is 2+2?")
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "".join(THOUGHTS)
    assert r.output_text == ANSWER
    with client.responses.stream(model=REASONER, input="What is 2+2?") as s:
        deltas = [e.delta for e in s if e.type == "response.reasoning_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == "".join(THOUGHTS)
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == ANSWER


def test_ollama_think(reasoner):
    client = ollama.Client(host=reasoner.hub, headers={"Authorization": f"Bearer {reasoner.key}"}, timeout=60)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    shown = client.chat(model=REASONER, messages=messages, think=True)
    assert shown.message.thinking == "".join(THOUGHTS) and shown.message.content == ANSWER
    hidden = client.chat(model=REASONER, messages=messages, think=False)
    assert not hidden.message.thinking and hidden.message.content == ANSWER
    parts = list(client.chat(model=REASONER, messages=messages, think=False, stream=True))
    assert not any(p.message.thinking for p in parts)
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    streamed = list(client.chat(model=REASONER, messages=messages, think="high", stream=True))
    assert "".join(p.message.thinking or "" for p in streamed) == "".join(THOUGHTS)
