#!/usr/bin/env python3
"""scripts/soak part (b): CONCURRENCY workers send streaming chat requests
to cortex for SECONDS, each reading its stream to `data: [DONE]`.

Prints one line: completed=N errors=N events=N seconds=S, then each distinct
error (at most 10). Standard library only.

usage: model_driver.py HOST:PORT MODEL SECONDS CONCURRENCY MAX_TOKENS
"""
import http.client
import json
import sys
import threading
import time

host, port = sys.argv[1].rsplit(":", 1)
model, seconds, concurrency, max_tokens = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
prompts = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU cache is in one sentence.",
]
lock = threading.Lock()
stats = {"completed": 0, "errors": 0, "events": 0}
errors = []
deadline = time.monotonic() + seconds


def one(conn, k):
    body = json.dumps({
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompts[k % len(prompts)]}],
    })
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError("status %d: %s" % (resp.status, data[:200]))
    text = data.decode("utf-8", "replace")
    if "data: [DONE]" not in text:
        raise RuntimeError("stream without [DONE]: %r" % text[-200:])
    if '"error"' in text:
        raise RuntimeError("error event in stream: %r" % text[-300:])
    return sum(1 for line in text.splitlines() if line.startswith("data: {"))


def worker(w):
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    k = w
    while time.monotonic() < deadline:
        try:
            n = one(conn, k)
            with lock:
                stats["completed"] += 1
                stats["events"] += n
        except Exception as e:  # noqa: BLE001 - every failure counts
            with lock:
                stats["errors"] += 1
                if len(errors) < 10:
                    errors.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=300)
        k += concurrency
    conn.close()


start = time.monotonic()
threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("completed=%d errors=%d events=%d seconds=%.1f" % (
    stats["completed"], stats["errors"], stats["events"], time.monotonic() - start))
for e in errors:
    print("error:", e)
