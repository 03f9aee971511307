"""Measures OpenAI-compatible engine servers against each other.

Driven by scripts/bench-engine, which builds `neuron` and the llama.cpp venv.
The client uses only the standard library. The servers are started one after
the other, each waited for until ready and warmed up; then the measuring
requests go to them in turn, one request at a time (so only one server
computes at any moment, and load from other processes hits both alike):

- prefill tok/s: /v1/completions, max_tokens=1, a ~500-token prompt whose
  first token differs on every request (defeats prompt-prefix caching);
  usage.prompt_tokens / wall time of the request; median and best of repeats.
- TTFT: streamed /v1/chat/completions of a short chat, time from sending the
  request to the first chunk with content; median.
- decode tok/s: streamed /v1/completions, max_tokens=128, greedy, a prompt
  that makes the model count on and on; (tokens - 1) / (time of last content
  chunk - time of first); tokens from `usage` (stream_options.include_usage)
  or, when the stream carries none, a non-streamed twin request; median, best.
- aggregate decode tok/s at 8 streams: 8 streamed /v1/completions (the
  counting prompt, each with its own number) sent at once; tokens that
  arrive while all 8 are decoding / the length of that window; median.
  Each 8-stream run follows a single-stream one on the same server; the
  8 ÷ 1 ratio is given both as median ÷ median and as the median of those
  adjacent pairs' ratios (robust to a machine whose speed drifts).
  (llama-server runs with -np 8; llama-cpp-python's server serves one
  request at a time, so its figure is its single-stream rate.)
- peak RSS: VmHWM of the server process from /proc/PID/status at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

WORDS_A = ["quiet", "bright", "ancient", "narrow", "heavy", "curious", "patient", "distant",
           "careful", "golden", "northern", "broken", "gentle", "restless", "hidden", "simple"]
WORDS_N = ["harbour", "library", "engine", "village", "garden", "mountain", "river", "market",
           "bridge", "workshop", "orchard", "station", "lantern", "valley", "kitchen", "tower"]
WORDS_V = ["watched", "repaired", "described", "measured", "painted", "visited", "counted",
           "remembered", "followed", "crossed", "opened", "studied", "guarded", "built"]


def long_prompt(seed: int, sentences: int) -> str:
    """A deterministic paragraph, different for every seed from its first word."""
    rng = random.Random(seed)
    # The first token differs between seeds, so no server can reuse a cached
    # prompt prefix from the previous request.
    out = [f"{seed * 7919 % 100003} {rng.choice(WORDS_A)} notes follow."]
    for _ in range(sentences):
        out.append(
            f"The {rng.choice(WORDS_A)} {rng.choice(WORDS_N)} was {rng.choice(WORDS_V)} by "
            f"a {rng.choice(WORDS_A)} traveller near the {rng.choice(WORDS_N)}, "
            f"{rng.randint(2, 99)} days after the {rng.choice(WORDS_A)} {rng.choice(WORDS_N)} "
            f"was {rng.choice(WORDS_V)}."
        )
    out.append("In summary,")
    return " ".join(out)


COUNT_PROMPT = "Here are the numbers from 1 to 1000, separated by commas: " + ", ".join(
    str(i) for i in range(1, 21)
) + ","


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    ready_path: str
    ready_ok: callable
    log_path: str
    proc: subprocess.Popen | None = None
    log: object = None
    model_id: str = ""
    results: dict = field(default_factory=dict)


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, raw


def post_json(port: int, path: str, body: dict) -> dict:
    status, raw = request(port, "POST", path, body)
    if status != 200:
        raise RuntimeError(f"POST {path} -> {status}: {raw[:500]!r}")
    return json.loads(raw)


class _Sse:
    """One streamed request on a raw socket: HTTP/1.1 headers, a chunked or
    length-delimited body, SSE events; `events` holds (arrival time, raw
    payload) pairs, parsed only after the measurement."""

    def __init__(self, port: int, path: str, body: dict):
        data = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        self.sock.sendall(head + data)
        self.sock.setblocking(False)
        self.raw = b""        # bytes not yet parsed at the HTTP level
        self.body = b""       # decoded body bytes not yet split into events
        self.status = None
        self.chunked = False
        self.left = None      # Content-Length still to come, when not chunked
        self.done = False
        self.events: list[tuple[float, bytes]] = []

    def feed(self, data: bytes, t: float) -> None:
        if not data:
            self.done = True
            return
        self.raw += data
        if self.status is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.raw[:end].decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for h in lines[1:]:
                k, _, v = h.partition(":")
                k, v = k.strip().lower(), v.strip().lower()
                if k == "transfer-encoding" and "chunked" in v:
                    self.chunked = True
                elif k == "content-length":
                    self.left = int(v)
            self.raw = self.raw[end + 4:]
        if self.chunked:
            while True:
                nl = self.raw.find(b"\r\n")
                if nl < 0:
                    break
                size = int(self.raw[:nl].split(b";")[0], 16)
                if size == 0:
                    self.done = True
                    break
                if len(self.raw) < nl + 2 + size + 2:
                    break
                self.body += self.raw[nl + 2:nl + 2 + size]
                self.raw = self.raw[nl + 2 + size + 2:]
        else:
            self.body += self.raw
            if self.left is not None:
                self.left -= len(self.raw)
                self.done = self.done or self.left <= 0
            self.raw = b""
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                break
            event, self.body = self.body[:end], self.body[end + 2:]
            for line in event.split(b"\n"):
                line = line.strip()
                if line.startswith(b"data:"):
                    self.events.append((t, line[5:].strip()))


def stream_many(port: int, path: str, bodies: list[dict]) -> list[list[tuple[float, dict]]]:
    """Sends the streamed requests at once and reads them all on this one
    thread (a selector over their sockets): (arrival time, event) per SSE
    data event of each, JSON parsed after the last stream ends. One thread
    and no per-event parsing keep the client's CPU off a small machine
    whose cores the servers use: with a thread and `http.client` per
    stream it took ~100-250 µs of CPU per token."""
    sel = selectors.DefaultSelector()
    streams = [_Sse(port, path, b) for b in bodies]
    for st in streams:
        sel.register(st.sock, selectors.EVENT_READ, st)
    open_ = len(streams)
    deadline = time.monotonic() + 600
    try:
        while open_:
            if time.monotonic() > deadline:
                raise RuntimeError(f"POST {path}: streams still open after 600 s")
            for key, _ in sel.select(timeout=5):
                st = key.data
                try:
                    data = st.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                st.feed(data, time.perf_counter())
                if st.done:
                    sel.unregister(st.sock)
                    open_ -= 1
    finally:
        for st in streams:
            st.sock.close()
    out = []
    for st in streams:
        if st.status != 200:
            raise RuntimeError(f"POST {path} (stream) -> {st.status}: {st.body[:500]!r}")
        evs = []
        for t, payload in st.events:
            if payload == b"[DONE]":
                break
            evs.append((t, json.loads(payload)))
        out.append(evs)
    return out


def stream(port: int, path: str, body: dict):
    """(time, event-json) for each SSE data event of one streamed request."""
    return stream_many(port, path, [body])[0]


def chunk_text(ev: dict) -> str:
    out = []
    for ch in ev.get("choices") or []:
        if "text" in ch and ch["text"]:
            out.append(ch["text"])
        delta = ch.get("delta") or {}
        if delta.get("content"):
            out.append(delta["content"])
    return "".join(out)


def wait_ready(srv: Server, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited with {srv.proc.returncode}; see {srv.log_path}")
        try:
            status, raw = request(srv.port, "GET", srv.ready_path, timeout=5)
            if srv.ready_ok(status, raw):
                return time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{srv.name} not ready after {timeout}s; see {srv.log_path}")


def proc_status(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        return None
    return None


def api_post(srv: Server, path: str, body: dict) -> dict:
    return post_json(srv.port, path, dict(body, model=srv.model_id))


def api_stream(srv: Server, path: str, body: dict):
    return stream(srv.port, path, dict(body, model=srv.model_id))


def served_model_id(srv: Server) -> str:
    status, raw = request(srv.port, "GET", "/v1/models")
    if status != 200:
        raise RuntimeError(f"{srv.name}: GET /v1/models -> {status}: {raw[:300]!r}")
    return json.loads(raw)["data"][0]["id"]


def warm_up(srv: Server) -> None:
    api_post(srv, "/v1/completions", {"prompt": long_prompt(10_000, 8), "max_tokens": 4, "temperature": 0})
    for _ in api_stream(srv, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0,
            "stream": True}):
        pass


def one_prefill(srv: Server, args, i: int) -> tuple[int, float]:
    prompt = long_prompt(i + 1 + args.seed_offset, args.prefill_sentences)
    t0 = time.perf_counter()
    r = api_post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})
    return r["usage"]["prompt_tokens"], time.perf_counter() - t0


def one_ttft(srv: Server, args, i: int) -> float:
    body = {"messages": [
        {"role": "system", "content": f"{1000 + i + args.seed_offset} is your assistant number."},
        {"role": "user", "content": "Give me one tip for writing clear documentation."}],
        "max_tokens": 8, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    for t, ev in api_stream(srv, "/v1/chat/completions", body):
        if first is None and chunk_text(ev):
            first = t
    if first is None:
        raise RuntimeError(f"{srv.name}: chat stream produced no content")
    return first - t0


def first_content(srv: Server, body: dict) -> float:
    t0 = time.perf_counter()
    first = None
    for t, ev in api_stream(srv, "/v1/chat/completions", body):
        if first is None and chunk_text(ev):
            first = t
    if first is None:
        raise RuntimeError(f"{srv.name}: chat stream produced no content")
    return first - t0


def one_prefix_ttft(srv: Server, args, i: int) -> tuple[float, float]:
    """TTFT of a chat with a fresh ~1,000-token system prompt, then of the
    next turn of an agent resending that system prompt with a new question:
    what a prefix cache saves."""
    system = long_prompt(50_000 + i + args.seed_offset, args.system_sentences)
    ask = lambda q: {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                     "max_tokens": 4, "temperature": 0, "stream": True}
    fresh = first_content(srv, ask("Summarise the notes in one sentence."))
    repeat = first_content(srv, ask("Which traveller appears first?"))
    return fresh, repeat


def one_decode(srv: Server, args, i: int) -> tuple[int, float, str]:
    prompt = f"({i + args.seed_offset}) " + COUNT_PROMPT
    body = {"prompt": prompt, "max_tokens": args.decode_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = None
    n = None
    for t, ev in api_stream(srv, "/v1/completions", body):
        if chunk_text(ev):
            if first is None:
                first = t
            last = t
        if ev.get("usage"):
            n = ev["usage"].get("completion_tokens")
    source = "stream usage"
    if n is None:
        # No usage in the stream (llama-cpp-python): ask again without
        # streaming; greedy decoding gives the same tokens.
        source = "non-streamed twin request"
        body2 = dict(body, stream=False)
        body2.pop("stream_options")
        n = api_post(srv, "/v1/completions", body2)["usage"]["completion_tokens"]
    if first is None or last is None or last <= first or n < 2:
        raise RuntimeError(f"{srv.name}: decode stream too short ({n} tokens)")
    return n, (n - 1) / (last - first), source


def one_aggregate(srv: Server, args, i: int, streams: int = 8) -> float:
    bodies = [{"prompt": f"({i * streams + j + args.seed_offset}) " + COUNT_PROMPT,
               "max_tokens": args.decode_tokens, "temperature": 0, "stream": True,
               "model": srv.model_id} for j in range(streams)]
    try:
        got = stream_many(srv.port, "/v1/completions", bodies)
    except Exception as e:  # surfaced with the server's name
        raise RuntimeError(f"{srv.name}: aggregate stream failed: {e!r}") from e
    times = [[t for t, ev in evs if chunk_text(ev)] for evs in got]
    if any(len(t) < 2 for t in times):
        raise RuntimeError(f"{srv.name}: an aggregate stream produced under 2 chunks")
    lo = max(t[0] for t in times)
    hi = min(t[-1] for t in times)
    if hi <= lo:
        # The streams never all decoded at once (served one after another).
        total = sum(len(t) - 1 for t in times)
        return total / (max(t[-1] for t in times) - min(t[0] for t in times))
    n = sum(sum(1 for x in t if lo < x <= hi) for t in times)
    return n / (hi - lo)


def measure_all(servers: list[Server], args) -> dict[str, dict]:
    """Interleaves the servers request by request, so that load from other
    processes on the machine (which varies over time) hits both alike."""
    res: dict[str, dict] = {s.name: {} for s in servers}
    raw: dict[str, dict[str, list]] = {s.name: {"pt": [], "ps": [], "pr": [], "ttft": [], "dt": [], "dr": []}
                                       for s in servers}
    for srv in servers:
        warm_up(srv)
        res[srv.name]["rss_after_warmup_kb"] = proc_status(srv.proc.pid, "VmRSS")
    for i in range(args.repeats):
        for srv in servers:
            n, dt = one_prefill(srv, args, i)
            raw[srv.name]["pt"].append(n)
            raw[srv.name]["ps"].append(dt)
            raw[srv.name]["pr"].append(n / dt)
    for i in range(args.repeats):
        for srv in servers:
            raw[srv.name]["ttft"].append(one_ttft(srv, args, i))
    for i in range(args.repeats):
        for srv in servers:
            fresh, repeat = one_prefix_ttft(srv, args, i)
            raw[srv.name].setdefault("pf", []).append(fresh)
            raw[srv.name].setdefault("pc", []).append(repeat)
    # Single-stream and 8-stream runs alternate, each 8-stream run right
    # after a single-stream one on the same server: on a shared machine
    # whose speed drifts by minutes, the ratio of such a pair compares like
    # with like (the medians of runs minutes apart moved the ratio by ±5 %).
    for i in range(max(args.decode_repeats, args.aggregate_repeats)):
        for srv in servers:
            if i < args.decode_repeats:
                n, rate, source = one_decode(srv, args, i)
                raw[srv.name]["dt"].append(n)
                raw[srv.name]["dr"].append(rate)
                res[srv.name]["decode_token_count_source"] = source
            if i < args.aggregate_repeats:
                raw[srv.name].setdefault("agg", []).append(one_aggregate(srv, args, i))
    for srv in servers:
        r, x = res[srv.name], raw[srv.name]
        if x.get("agg"):
            r["aggregate8_tok_s"] = statistics.median(x["agg"])
            r["aggregate8_tok_s_all"] = x["agg"]
            r["aggregate8_over_single"] = r["aggregate8_tok_s"] / statistics.median(x["dr"])
            pairs = [a / d for a, d in zip(x["agg"], x["dr"])]
            r["aggregate8_over_single_pairs"] = pairs
            r["aggregate8_over_single_paired"] = statistics.median(pairs)
        r["prefill_prompt_tokens"] = int(statistics.median(x["pt"]))
        r["prefill_s"] = statistics.median(x["ps"])
        r["prefill_tok_s"] = statistics.median(x["pr"])
        r["prefill_tok_s_best"] = max(x["pr"])
        r["prefill_tok_s_all"] = x["pr"]
        r["ttft_short_chat_s"] = statistics.median(x["ttft"])
        r["ttft_short_chat_s_all"] = x["ttft"]
        r["ttft_system_fresh_ms"] = statistics.median(x["pf"]) * 1000
        r["ttft_system_repeat_ms"] = statistics.median(x["pc"]) * 1000
        r["prefix_cache_speedup"] = statistics.median(f / c for f, c in zip(x["pf"], x["pc"]))
        r["ttft_system_all"] = list(zip(x["pf"], x["pc"]))
        r["decode_tokens"] = int(statistics.median(x["dt"]))
        r["decode_tok_s"] = statistics.median(x["dr"])
        r["decode_tok_s_best"] = max(x["dr"])
        r["decode_tok_s_all"] = x["dr"]
        r["peak_rss_kb"] = proc_status(srv.proc.pid, "VmHWM")
    return res


def start(srv: Server, args) -> None:
    print(f"[{srv.name}] starting: {' '.join(srv.cmd)}", file=sys.stderr)
    srv.log = open(srv.log_path, "wb")
    srv.proc = subprocess.Popen(srv.cmd, stdout=srv.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    srv.results["ready_s"] = wait_ready(srv, args.ready_timeout)
    srv.model_id = served_model_id(srv)
    print(f"[{srv.name}] ready after {srv.results['ready_s']:.1f}s", file=sys.stderr)


def stop(srv: Server) -> None:
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
    if srv.log is not None:
        srv.log.close()


def fmt_table(results: dict[str, dict]) -> str:
    rows = [
        ("prefill tok/s (median)", "prefill_tok_s", "{:.1f}", True),
        ("prefill tok/s (best)", "prefill_tok_s_best", "{:.1f}", True),
        ("prefill prompt tokens", "prefill_prompt_tokens", "{:d}", None),
        ("prefill time, s", "prefill_s", "{:.3f}", False),
        ("TTFT short chat, ms (median)", "ttft_short_chat_s", "{:.0f}", False),
        ("TTFT, fresh ~1k-token system prompt, ms", "ttft_system_fresh_ms", "{:.0f}", False),
        ("TTFT, same system prompt again, ms", "ttft_system_repeat_ms", "{:.0f}", False),
        ("prefix cache TTFT speed-up, ×", "prefix_cache_speedup", "{:.1f}", True),
        ("decode tok/s (median)", "decode_tok_s", "{:.1f}", True),
        ("decode tok/s (best)", "decode_tok_s_best", "{:.1f}", True),
        ("decode tokens", "decode_tokens", "{:d}", None),
        ("aggregate decode, 8 streams, tok/s (median)", "aggregate8_tok_s", "{:.1f}", True),
        ("8 streams ÷ single stream, ×", "aggregate8_over_single", "{:.2f}", True),
        ("8 streams ÷ single stream, median of adjacent pairs, ×",
         "aggregate8_over_single_paired", "{:.2f}", True),
        ("peak RSS, MiB", "peak_rss_kb", "{:.0f}", False),
        ("ready after start, s", "ready_s", "{:.1f}", False),
    ]
    names = list(results)
    others = names[1:]
    head = f"| metric | {' | '.join(names)} |"
    head += "".join(f" {names[0]}/{o} |" for o in others)
    lines = [head, "|" + "---|" * (len(names) + 1 + len(others))]
    for label, key, f, _higher_better in rows:
        vals = []
        raw = []
        for n in names:
            v = results[n].get(key)
            if key == "ttft_short_chat_s" and v is not None:
                v = v * 1000
            if key == "peak_rss_kb" and v is not None:
                v = v / 1024
            raw.append(v)
            vals.append("n/a" if v is None else f.format(v))
        line = f"| {label} | {' | '.join(vals)} |"
        for j in range(1, len(names)):
            a, b = raw[0], raw[j]
            if _higher_better is None or a is None or not b:
                line += " |"
            else:
                line += f" {a / b:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--neuron", help="path to the neuron binary (omit to skip helexa)")
    ap.add_argument("--llama-python", help="python of the llama-cpp-python venv (omit to skip llama.cpp)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary (omit to skip it)")
    ap.add_argument("--aggregate-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-sentences", type=int, default=21,
                    help="sentences in the prefill prompt (21 gives ~500 SmolLM2 tokens)")
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--system-sentences", type=int, default=40,
                    help="sentences of the repeated system prompt (~25 tokens each)")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    servers = []
    if args.neuron:
        port = args.port
        servers.append(Server(
            name="helexa",
            cmd=[args.neuron, "engine", "--model", args.model, "--listen", f"127.0.0.1:{port}",
                 "--threads", str(args.threads)],
            port=port,
            ready_path="/health",
            ready_ok=lambda s, raw: s == 200 and json.loads(raw).get("status") == "ready",
            log_path=os.path.join(args.out, "helexa-engine.log"),
        ))
    if args.llama_server:
        port = args.port + 2
        servers.append(Server(
            name="llama-server",
            cmd=[args.llama_server, "-m", args.model, "-t", str(args.threads),
                 "-tb", str(args.threads), "-c", "16384", "-np", "8", "--jinja",
                 "--host", "127.0.0.1", "--port", str(port)],
            port=port,
            ready_path="/health",
            ready_ok=lambda s, raw: s == 200,
            log_path=os.path.join(args.out, "llama-server.log"),
        ))
    if args.llama_python:
        port = args.port + 1
        servers.append(Server(
            name="llama.cpp",
            cmd=[args.llama_python, "-m", "llama_cpp.server", "--model", args.model,
                 "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                 "--n_ctx", "8192", "--interrupt_requests", "False",
                 # The server defaults to logits_all=True (logits of every
                 # prompt position, copied to Python); helexa computes only
                 # the last position's, so compare like with like.
                 "--logits_all", "False",
                 "--host", "127.0.0.1", "--port", str(port)],
            port=port,
            ready_path="/v1/models",
            ready_ok=lambda s, raw: s == 200,
            log_path=os.path.join(args.out, "llama-cpp-server.log"),
        ))
    if not servers:
        ap.error("nothing to measure: pass --neuron, --llama-server and/or --llama-python")

    try:
        # Started one after the other (loading is timed alone), then measured
        # request by request in turn: only one server computes at a time.
        for srv in servers:
            start(srv, args)
        print("measuring", file=sys.stderr)
        results = measure_all(servers, args)
    finally:
        for srv in servers:
            stop(srv)
    for srv in servers:
        results[srv.name]["ready_s"] = srv.results["ready_s"]
        print(f"[{srv.name}] {json.dumps(results[srv.name])}", file=sys.stderr)

    report = {
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": results,
    }
    with open(os.path.join(args.out, "bench-engine.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"model {report['model']}, {args.threads} threads, {report['cpu']}, "
          f"load average at end {report['loadavg_at_end'][0]:.2f}")
    print(fmt_table(results))
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
