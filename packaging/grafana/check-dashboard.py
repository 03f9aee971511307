#!/usr/bin/env python3
# Checks a Grafana dashboard (default packaging/grafana/helexa.json): every
# panel expression and query variable names only metrics cortex and neuron
# export (the list below, from cortex-gateway/src/metrics.rs and the neuron
# metrics of PROTOCOL.md section 8), and, with --rules OUT, writes the
# expressions as recording rules for `promtool check rules` (syntax check).
import json, re, sys
METRICS = """cortex_requests_total cortex_request_duration_seconds cortex_time_to_first_token_seconds
cortex_tokens_total cortex_upstream_retries_total cortex_prevalidation_rejections_total cortex_neuron_up
cortex_model_in_flight cortex_model_queue_depth cortex_model_loads_total
neuron_model_in_flight neuron_model_queue_depth neuron_requests_admitted_total neuron_requests_refused_total
neuron_requests_total neuron_request_duration_seconds neuron_prompt_tokens_total neuron_generated_tokens_total
neuron_time_to_first_token_seconds neuron_inter_token_latency_seconds neuron_engine_restarts_total
neuron_engine_health_failures_total neuron_model_load_seconds neuron_model_memory_bytes neuron_model_up
neuron_build_info up""".split()
HIST = {"cortex_request_duration_seconds", "cortex_time_to_first_token_seconds", "neuron_request_duration_seconds",
        "neuron_time_to_first_token_seconds", "neuron_inter_token_latency_seconds", "neuron_model_load_seconds"}
known = set(METRICS) | {h + s for h in HIST for s in ("_bucket", "_sum", "_count")}
WORDS = set("""sum avg min max count rate irate increase delta histogram_quantile by without on ignoring group_left
group_right and or unless bool offset topk bottomk quantile stddev stdvar count_values abs clamp_min clamp_max clamp
label_values label_replace label_join time vector scalar sort sort_desc absent absent_over_time avg_over_time
max_over_time min_over_time sum_over_time count_over_time changes resets deriv predict_linear ceil floor round
exp ln log2 log10 sqrt timestamp day_of_week hour minute month year""".split())
def names(expr):
    e = re.sub(r'label_values\(([^,()]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)', r'\1', expr)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)             # strings
    e = re.sub(r'\{[^}]*\}', '', e)                          # label matchers
    e = re.sub(r'\[[^\]]*\]', '', e)                         # ranges
    e = re.sub(r'\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', '', e)
    e = re.sub(r'\$\w+', '', e)                              # grafana variables
    toks = re.findall(r'(?<![\w.])([a-zA-Z_:][\w:]*)', e)
    return [t for t in toks if t not in WORDS]
args = sys.argv[1:]
rules_out = None
if "--rules" in args:
    i = args.index("--rules")
    rules_out = args[i + 1]
    del args[i:i + 2]
path = args[0] if args else "packaging/grafana/helexa.json"
d = json.load(open(path))
bad, n = [], 0
def walk(ps):
    for p in ps:
        yield p
        yield from walk(p.get("panels", []))
exprs = []
for p in walk(d.get("panels", [])):
    for t in p.get("targets", []):
        if t.get("expr"):
            exprs.append((p.get("title"), t["expr"]))
for v in d.get("templating", {}).get("list", []):
    q = v.get("query")
    if isinstance(q, dict): q = q.get("query")
    if v.get("type") == "query" and q:
        exprs.append(("variable " + v["name"], q))
for title, e in exprs:
    n += 1
    for m in names(e):
        if m not in known:
            bad.append(f"{title!r}: unknown metric {m!r} in {e!r}")
if not exprs:
    bad.append("no expressions found")
if rules_out:
    # Grafana's variables replaced by what Prometheus itself would accept.
    sub = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$model": ".*"}
    with open(rules_out, "w") as f:
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for i, (title, e) in enumerate(exprs):
            if e.startswith("label_values("):
                e = re.sub(r'label_values\(([^,()]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)', r'\1', e)
            for k, v in sub.items():
                e = e.replace(k, v)
            f.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(e)}\n")
for b in bad: print("  " + b)
print(f"  {n} expressions, {len(bad)} unknown metric names")
sys.exit(1 if bad else 0)
