"""End-to-end test with the official `openai` Python client against a real model.

A module-scoped fixture starts, in a temporary directory:
  hub      `potluck hub` on a free port, with a fresh data dir;
  backend  llama.cpp's server (xllamacpp wheel) serving SmolLM2-135M-Instruct;
  agent    `potluck provide`, which dials out to the hub and shares the backend.
Then the tests talk to the hub exactly as any OpenAI SDK user would.

Run with the venv that scripts/realbackend/setup.sh creates:
    ~/.cache/potluck/realbackend/venv/bin/python -m pytest -q tests/python
Env: POTLUCK_BIN (default target/debug/potluck), POTLUCK_REAL_MODEL (GGUF path).
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
RB_HOME = Path(os.environ.get("POTLUCK_CACHE", Path.home() / ".cache/potluck")) / "realbackend"
BIN = os.environ.get("POTLUCK_BIN", str(REPO / "target/debug/potluck"))
MODEL_PATH = os.environ.get("POTLUCK_REAL_MODEL", str(RB_HOME / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
VENV_PY = RB_HOME / "venv/bin/python"
MODEL = "smollm2-135m-instruct"
# SmolLM2's own chat template has no tools (llama.cpp's /props says supports_tools=false,
# and the hub then refuses requests with tools for want of a capable provider); this one
# renders them. Only for the default model: another GGUF keeps its own template.
TOOLS_TEMPLATE = [] if "POTLUCK_REAL_MODEL" in os.environ else [
    "--chat-template-file", str(REPO / "scripts/realbackend/smollm2-tools.jinja")]
STARTUP_S = 60


def start(procs, tmp, name, argv):
    """Start a process with stdout/stderr going to TMP/NAME.out and TMP/NAME.err."""
    env = dict(os.environ, NO_COLOR="1")
    with open(tmp / f"{name}.out", "wb") as out, open(tmp / f"{name}.err", "wb") as err:
        procs[name] = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)


def wait_for(what, check, procs, deadline):
    """Poll `check()` until it returns something truthy; fail if a process dies or time runs out."""
    while True:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def url_in(path, pattern):
    match = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
    return match and match.group(1)


def served_models(base_url, key):
    req = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return [m["id"] for m in json.load(resp)["data"]]
    except OSError:
        return []


def cli(*args):
    return subprocess.run([BIN, *args], check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def dump_logs(request, tmp, lines=30):
    """Print the tail of every process's stderr log, past pytest's output capture."""
    text = ""
    for log in sorted(tmp.glob("*.err")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        text += f"\n----- {log.name} (last {len(tail)} lines) -----\n" + "\n".join(tail) + "\n"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        sys.stderr.write(text)


def stop_all(procs):
    for p in reversed(list(procs.values())):  # agent, backend, hub
        p.terminate()
    for p in reversed(list(procs.values())):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("potluck")
    procs = {}
    failed_before = request.session.testsfailed
    try:
        deadline = time.monotonic() + STARTUP_S
        start(procs, tmp, "hub", [BIN, "hub", "--listen", "127.0.0.1:0", "--data-dir", str(tmp / "data")])
        hub = wait_for("hub URL", lambda: url_in(tmp / "hub.out", r"potluck hub listening on (http://\S+)"),
                       procs, deadline)
        admin = ["--hub", hub, "--admin-key-file", str(tmp / "data/admin.key")]
        key = cli("keys", "create", "--name", "pytest", *admin)
        token = cli("providers", "create", "--name", "pytest-provider", *admin)

        python = str(VENV_PY if VENV_PY.exists() else sys.executable)
        start(procs, tmp, "backend", [
            python, "-u", str(REPO / "scripts/realbackend/serve_xllamacpp.py"), MODEL_PATH, "0",
            "--exit-with-parent", "--threads", "1", "--parallel", "4", "--alias", MODEL,
            "--embeddings", "--pooling", "mean", *TOOLS_TEMPLATE])
        backend = wait_for("backend URL", lambda: url_in(tmp / "backend.out", r"listening on (http://\S+)"),
                           procs, deadline)
        start(procs, tmp, "agent", [BIN, "provide", "--hub", hub, "--token", token, "--backend", f"{backend}/v1"])
        wait_for(f"{MODEL} in /v1/models", lambda: MODEL in served_models(f"{hub}/v1", key), procs, deadline)
    except BaseException:
        dump_logs(request, tmp)
        stop_all(procs)
        raise
    yield SimpleNamespace(base_url=f"{hub}/v1", key=key, hub=hub, admin=admin, tmp=tmp)
    if request.session.testsfailed > failed_before:
        dump_logs(request, tmp)
    stop_all(procs)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0, timeout=120)


def chat(client, **kw):
    msgs = [{"role": "user", "content": "Name three colours."}]
    return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, **kw)


def test_models_list(client):
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models
    assert models[MODEL].model_dump()["providers"] == 1


def test_chat(client):
    r = chat(client)
    assert r.choices[0].message.content.strip()
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.model == MODEL


def test_chat_stream_with_usage(client):
    with chat(client, stream=True, stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")


def test_chat_stream_without_usage(client):
    with chat(client, stream=True) as stream:
        chunks = list(stream)
    assert len(chunks) > 1
    assert all(c.usage is None for c in chunks)


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["hello world", "goodbye moon"])
    vectors = [d.embedding for d in r.data]
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) > 0


def test_wrong_key(stack):
    bad = openai.OpenAI(base_url=stack.base_url, api_key="pk-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        chat(bad)
    assert e.value.status_code == 401


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_missing_messages(client):
    # The typed create() refuses to send this, so post the raw body.
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body={"model": MODEL}, cast_to=object)
    assert e.value.status_code == 400


def test_prompt_past_the_context(client):
    # llama.cpp refuses a prompt far past its context; the agent reads its figures and the
    # hub says so as OpenAI does, without llama.cpp's text.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 200000}])
    assert e.value.code == "context_length_exceeded"
    assert "maximum context length" in str(e.value)


def test_prompt_past_the_context_as_llama_cpp_counts_it(client):
    # A prompt of one-digit words, which SmolLM2's tokenizer splits into about a token a
    # byte: the hub's estimate (four bytes a token) finds it within the context the agent
    # announced, and llama.cpp itself refuses it; the agent reads llama.cpp's figures and
    # the hub says so in OpenAI's words, not llama.cpp's.
    context = next(m for m in client.models.list().data if m.id == MODEL).model_extra["context_length"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=8,
                                       messages=[{"role": "user", "content": "7 " * (context * 3 // 4)}])
    assert e.value.code == "context_length_exceeded", e.value
    # The backend's count ("resulted in"), not the hub's estimate ("about").
    assert "However, your messages resulted in" in str(e.value), e.value
