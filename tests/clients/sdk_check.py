"""Drives a running cortex with the official `openai` and `anthropic` SDKs.

Started by tests/clients/run, which sets HELEXA_BASE (cortex's base URL) and,
when an embedding model is served, HELEXA_EMBED_MODEL. Every check asserts on
what the SDK parsed, so a shape the SDK cannot read fails here. The chat model
is tiny (SmolLM2-135M): checks rely on constrained decoding and greedy
determinism, not on the model being clever.
"""

import json
import math
import os
import sys

import anthropic
import jsonschema
import openai
from pydantic import BaseModel, Field

BASE = os.environ["HELEXA_BASE"]
CHAT = os.environ.get("HELEXA_CHAT_MODEL", "smollm2-135m-instruct")
EMBED = os.environ.get("HELEXA_EMBED_MODEL", "")

oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-unused", max_retries=0, timeout=300)
an = anthropic.Anthropic(base_url=BASE, api_key="sk-unused", max_retries=0, timeout=300)
# The anthropic SDK has no `temperature` argument any more; cortex accepts the
# field, and greedy decoding makes streamed and whole answers comparable.
GREEDY = {"temperature": 0}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER,
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

checks = []


def check(fn):
    checks.append(fn)
    return fn


@check
def chat_plain_and_cached_prefix():
    msgs = [
        {"role": "system", "content": "You are a helpful geography tutor. " * 8},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    a = oa.chat.completions.create(model=CHAT, messages=msgs, max_tokens=24, temperature=0)
    assert "Paris" in a.choices[0].message.content, a
    b = oa.chat.completions.create(model=CHAT, messages=msgs, max_tokens=24, temperature=0)
    assert b.choices[0].message.content == a.choices[0].message.content
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached == b.usage.prompt_tokens - 1, b.usage


@check
def chat_tools_required_non_stream_and_stream():
    # One call: a 135M model under the `required` grammar would otherwise
    # repeat the call until max_tokens.
    r = oa.chat.completions.create(
        model=CHAT, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=96, temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER)

    stream = oa.chat.completions.create(
        model=CHAT, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=96, temperature=0, stream=True,
    )
    parts, name, finish = [], None, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                if tc.function.name:
                    name = tc.function.name
                if tc.function.arguments:
                    parts.append(tc.function.arguments)
            finish = c.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls", (name, finish)
    assert "".join(parts) == call.function.arguments, (parts, call.function.arguments)


@check
def chat_named_tool_and_tool_turn():
    r = oa.chat.completions.create(
        model=CHAT, messages=ASK, tools=TOOLS, max_tokens=96, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = r.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    follow = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'},
    ]
    r2 = oa.chat.completions.create(model=CHAT, messages=follow, tools=TOOLS, max_tokens=32, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls"), r2


class City(BaseModel):
    # Bounds keep a 135M model from writing one string until max_tokens.
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


@check
def chat_parse_with_pydantic():
    r = oa.chat.completions.parse(
        model=CHAT,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=160,
        temperature=0,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City), r


@check
def responses_text_non_stream_and_stream():
    r = oa.responses.create(
        model=CHAT, instructions="Answer briefly.", input="What is the capital of France?",
        max_output_tokens=24, temperature=0,
    )
    assert r.status in ("completed", "incomplete"), r
    # What a 135M model answers varies with the prompt; the checks are on
    # the shapes, and on streamed ≡ whole under greedy decoding.
    assert r.output_text.strip(), r
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0, r
    deltas, completed, seqs = [], None, []
    with oa.responses.stream(
        model=CHAT, instructions="Answer briefly.", input="What is the capital of France?",
        max_output_tokens=24, temperature=0,
    ) as s:
        for ev in s:
            seqs.append(ev.sequence_number)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            if ev.type in ("response.completed", "response.incomplete"):
                completed = ev.response
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert completed is not None
    assert "".join(deltas) == r.output_text == completed.output_text


@check
def responses_function_call_and_structured_output():
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}]
    r = oa.responses.create(
        model=CHAT, input="What is the weather in Paris?", tools=tools, tool_choice="required", parallel_tool_calls=False,
        max_output_tokens=96, temperature=0,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    parsed = oa.responses.parse(
        model=CHAT, input="Describe Paris as JSON.", text_format=City, max_output_tokens=160, temperature=0
    )
    assert isinstance(parsed.output_parsed, City), parsed


@check
def embeddings():
    assert EMBED, "tests/clients/run serves the embedding model (scripts/fetch-embedding-model)"
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Quarterly revenue rose by 4%."]
    r = oa.embeddings.create(model=EMBED, input=texts)  # the SDK asks for base64
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vecs)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2, (cos(vecs[0], vecs[1]), cos(vecs[0], vecs[2]))
    assert r.usage.prompt_tokens > 0
    f = oa.embeddings.create(model=EMBED, input=texts[0], encoding_format="float")
    assert max(abs(a - b) for a, b in zip(f.data[0].embedding, vecs[0])) < 1e-6


@check
def anthropic_messages_non_stream_and_stream():
    m = an.messages.create(
        model=CHAT, max_tokens=24, extra_body=GREEDY, system="Answer briefly.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert m.type == "message" and m.role == "assistant", m
    assert m.stop_reason in ("end_turn", "max_tokens"), m
    text = "".join(b.text for b in m.content if b.type == "text")
    assert text.strip(), m
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0
    with an.messages.stream(
        model=CHAT, max_tokens=24, extra_body=GREEDY, system="Answer briefly.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    ) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text, (streamed, text)
    assert final.stop_reason == m.stop_reason


@check
def anthropic_tool_use():
    tools = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}]
    m = an.messages.create(
        model=CHAT, max_tokens=96, extra_body=GREEDY, tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    assert m.stop_reason == "tool_use", m
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER)
    with an.messages.stream(
        model=CHAT, max_tokens=96, extra_body=GREEDY, tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    ) as s:
        final = s.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.input == use.input, (streamed.input, use.input)
    # The tool's answer goes back as a tool_result turn.
    m2 = an.messages.create(
        model=CHAT, max_tokens=32, extra_body=GREEDY, tools=tools,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]},
        ],
    )
    assert m2.stop_reason in ("end_turn", "max_tokens", "tool_use"), m2


@check
def errors_are_parsed_by_the_sdks():
    try:
        oa.chat.completions.create(model="no-such-model", messages=ASK, max_tokens=4)
        raise AssertionError("no error")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    try:
        an.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
        raise AssertionError("no error")
    except anthropic.NotFoundError as e:
        assert e.body["error"]["type"] == "not_found_error", e.body


failed = 0
for fn in checks:
    try:
        fn()
        print(f"ok   {fn.__name__}")
    except Exception as e:  # noqa: BLE001 - report every failing check
        failed += 1
        print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
