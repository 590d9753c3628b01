#!/usr/bin/env python3
"""Run llama.cpp's native HTTP server (the llama-server code, embedded) via the
prebuilt PyPI wheel `xllamacpp`, bound to 127.0.0.1 only.

Usage: serve_xllamacpp.py MODEL.gguf PORT [--ctx N] [--threads N] [--parallel N]
                          [--alias NAME] [--embeddings] [--pooling mean|last|cls|none]
                          [--api-key KEY] [--chat-template-file FILE.jinja]
Runs in the foreground until SIGTERM/SIGINT.
"""
import argparse
import signal
import sys
import threading

import xllamacpp as xlc  # pinned in setup.sh

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("port", type=int)
ap.add_argument("--ctx", type=int, default=4096)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--parallel", type=int, default=4)
ap.add_argument("--alias", default="")
ap.add_argument("--embeddings", action="store_true")
ap.add_argument("--pooling", default="")
ap.add_argument("--api-key", default="")
ap.add_argument("--chat-template-file", default="",
                help="a Jinja chat template to use instead of the model's own "
                     "(smollm2-tools.jinja gives SmolLM2 tool calls)")
ap.add_argument("--exit-with-parent", action="store_true",
                help="exit when the parent process goes away (for test harnesses)")
a = ap.parse_args()

p = xlc.CommonParams()
p.model.path = a.model
p.hostnames = ["127.0.0.1"]
p.port = a.port
p.n_ctx = a.ctx
p.n_parallel = a.parallel
p.cpuparams.n_threads = a.threads
p.cpuparams_batch.n_threads = a.threads
p.use_jinja = True
p.kv_unified = True  # all slots share the whole context (like llama-server --kv-unified)
p.ui = False
p.endpoint_metrics = True
if a.alias:
    p.model_alias = {a.alias}
if a.api_key:
    p.api_keys = [a.api_key]
if a.embeddings:
    p.embedding = True
if a.chat_template_file:
    with open(a.chat_template_file, encoding="utf-8") as f:
        p.chat_template = f.read()
if a.pooling:
    p.pooling_type = getattr(xlc.llama_pooling_type, "LLAMA_POOLING_TYPE_" + a.pooling.upper())

srv = xlc.Server(p)  # starts the HTTP server on a background thread
print(f"xllamacpp listening on {srv.listening_address}", flush=True)

stop = threading.Event()
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda *_: stop.set())
if a.exit_with_parent:
    import os
    parent = os.getppid()
    while not stop.wait(0.5):
        if os.getppid() != parent:
            break
else:
    stop.wait()
sys.exit(0)
