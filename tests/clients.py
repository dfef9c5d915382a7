#!/usr/bin/env python3
"""The official Python clients, unmodified, against a running `sollol serve`.

usage: clients.py http://127.0.0.1:PORT
Prints one line per check and a closing 'N passed, N failed' line.
"""
import sys
import traceback

import json

import jsonschema
import ollama
import openai

BASE = sys.argv[1]
MODEL = "smollm2"
passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        print(f"ok   {name}")
        passed += 1
    except Exception:
        print(f"FAIL {name}")
        traceback.print_exc()
        failed += 1


o = ollama.Client(host=BASE)


def ollama_generate():
    r = o.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 6})
    assert "Paris" in r.response, r.response
    assert r.done and r.eval_count > 0 and r.prompt_eval_count == 5, r


def ollama_generate_stream():
    parts = list(o.generate(model=MODEL, prompt="Count: 1, 2, 3,", stream=True, options={"num_predict": 6, "seed": 1}))
    assert len(parts) >= 2 and parts[-1].done and not parts[0].done, parts


def ollama_chat():
    r = o.chat(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], options={"temperature": 0, "num_predict": 16})
    assert r.message.role == "assistant" and "Paris" in r.message.content, r.message


def ollama_chat_stream():
    parts = list(o.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True, options={"num_predict": 5}))
    assert parts[-1].done and "".join(p.message.content for p in parts), parts


def ollama_list():
    names = [m.model for m in o.list().models]
    assert MODEL in names, names


def ollama_show_and_ps():
    s = o.show(MODEL)
    assert s.modelinfo["general.architecture"] == "llama", s
    assert any(m.model == MODEL for m in o.ps().models)


c = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")


def openai_chat():
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=16)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content, r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def openai_chat_stream():
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True, seed=3))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length"), chunks


def openai_completion():
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text, r


def openai_completion_stream():
    chunks = list(c.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks), chunks


def sorted_desc(xs):
    return all(a >= b for a, b in zip(xs, xs[1:]))


def ollama_logprobs():
    r = o.generate(model=MODEL, prompt="The capital of France is", raw=True, logprobs=True, top_logprobs=3,
                   options={"temperature": 0, "num_predict": 4})
    assert len(r.logprobs) == r.eval_count, r
    for lp in r.logprobs:
        tops = [t.logprob for t in lp.top_logprobs]
        # Greedy: the chosen token is the most likely, and log-probabilities are <= 0.
        assert lp.logprob <= 0 and len(tops) == 3 and sorted_desc(tops) and lp.logprob == tops[0], lp
    assert "".join(lp.token for lp in r.logprobs) == r.response, r
    # Streamed: each line carries its own tokens' log-probabilities, the same as above.
    lines = list(o.generate(model=MODEL, prompt="The capital of France is", raw=True, logprobs=True, top_logprobs=3, stream=True,
                            options={"temperature": 0, "num_predict": 4}))
    assert all("".join(lp.token for lp in (p.logprobs or [])) == p.response for p in lines), lines
    assert [lp.logprob for p in lines for lp in (p.logprobs or [])] == [lp.logprob for lp in r.logprobs], lines


def openai_chat_logprobs():
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
                                  temperature=0.8, seed=5, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, r
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        # Sampled: the distribution drawn from; its most likely four carry at most all the mass.
        assert t.logprob <= 0 and sorted_desc(tops) and sum(2.718281828 ** x for x in tops) <= 1 + 1e-5, t
        assert t.logprob in tops or t.logprob <= tops[-1], t
    assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2).choices[0].logprobs is None
    # Streamed, the same seed: every chunk with text carries its tokens', and together they are the answer's.
    chunks = [ch for ch in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0.8,
                                                     seed=5, logprobs=True, top_logprobs=4, stream=True) if ch.choices and ch.choices[0].delta.content]
    assert all(ch.choices[0].logprobs.content for ch in chunks), chunks
    assert [t.logprob for ch in chunks for t in ch.choices[0].logprobs.content] == [t.logprob for t in content], chunks


def openai_completion_logprobs():
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens, lp
    assert "".join(lp.tokens) == r.choices[0].text and all(x <= 0 for x in lp.token_logprobs), lp
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0, lp
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                                                       logprobs=2, stream=True) if ch.choices and ch.choices[0].logprobs]
    assert [x for s in streamed for x in s.text_offset] == lp.text_offset and [x for s in streamed for x in s.tokens] == lp.tokens, streamed


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 30}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "sunny": {"type": "boolean"},
     "temps": {"type": "array", "items": {"type": "integer", "minimum": -40, "maximum": 50}, "minItems": 1, "maxItems": 3}}, "required": ["city", "sunny", "temps"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]


def ollama_structured_outputs():
    # Every schema, several seeds, sampled at a temperature: the output parses and validates.
    for i, schema in enumerate(SCHEMAS):
        for seed in range(4):
            r = o.chat(model=MODEL, messages=[{"role": "user", "content": "Answer in JSON."}], format=schema,
                       options={"temperature": 0.9, "seed": seed, "num_predict": 160})
            jsonschema.validate(json.loads(r.message.content), schema)
    # JSON mode: any object, bounded only by num_predict (this model may
    # repeat itself until that cuts it: then what it wrote is an object's start).
    for t in (0.0, 0.5):
        r = o.chat(model=MODEL, messages=[{"role": "user", "content": "Give a short JSON object about a dog."}], format="json",
                   options={"temperature": t, "seed": 2, "num_predict": 300})
        if r.done_reason == "stop":
            assert isinstance(json.loads(r.message.content), dict), r
        else:
            assert r.done_reason == "length" and r.message.content.startswith("{"), r


def openai_structured_outputs():
    for seed in range(3):
        schema = SCHEMAS[seed % len(SCHEMAS)]
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Answer in JSON."}], temperature=1.0, seed=seed,
                                      max_tokens=160, response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a short JSON object about a dog."}], max_tokens=300,
                                  temperature=0, response_format={"type": "json_object"})
    # An object with no bound on its size may be cut by max_tokens (this
    # model repeats itself greedily); what it wrote is then an object's start.
    content = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict), r
    else:
        assert content.startswith("{") and r.choices[0].finish_reason == "length", r


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
      city: The city's name
    """
    return {"Oslo": "4 degrees, rain", "Rome": "25 degrees, sunny", "Lima": "18 degrees, cloudy", "Paris": "12 degrees, windy"}[city]


# The city's length is bounded so that a call sampled at temperature 1 ends
# within the tests' token limits (the grammar enforces it; an unbounded
# string may run on, which is the model's right, not a fault).
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name", "maxLength": 24}},
                          "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}}}


def weather_history(with_ids):
    """Three earlier turns that each called the tool: the pattern a 135M
    model follows when asked about a fourth city, choosing the call itself."""
    msgs = []
    for i, city in enumerate(["Oslo", "Rome", "Lima"]):
        call = {"function": {"name": "get_weather", "arguments": {"city": city}}}
        reply = {"role": "tool", "content": get_weather(city), "tool_name": "get_weather"}
        if with_ids:
            call = {"id": f"call{i}abcd", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
            reply = {"role": "tool", "content": get_weather(city), "tool_call_id": f"call{i}abcd"}
        msgs += [{"role": "user", "content": f"What is the weather in {city}?"}, {"role": "assistant", "content": "", "tool_calls": [call]}, reply,
                 {"role": "assistant", "content": f"It is {get_weather(city)} in {city}."}]
    return msgs + [{"role": "user", "content": "What is the weather in Paris?"}]


def ollama_tools():
    # The model decides (Ollama has no tool_choice); the client sends the
    # Python function's own signature as the tool.
    msgs = weather_history(False)
    r = o.chat(model=MODEL, messages=msgs, tools=[get_weather], options={"temperature": 0, "num_predict": 40})
    calls = r.message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].function.arguments == {"city": "Paris"}, r.message
    assert r.message.content == "", r.message
    streamed = [p for p in o.chat(model=MODEL, messages=msgs, tools=[get_weather], stream=True, options={"temperature": 0, "num_predict": 40})]
    assert [c.function.arguments for p in streamed for c in (p.message.tool_calls or [])] == [{"city": "Paris"}], streamed
    assert "".join(p.message.content for p in streamed) == "", "a call's text is not streamed as content"
    # The round trip: the call and the tool's answer go back, the model uses it.
    msgs += [r.message, {"role": "tool", "content": get_weather("Paris"), "tool_name": "get_weather"}]
    answer = o.chat(model=MODEL, messages=msgs, tools=[get_weather], options={"temperature": 0, "num_predict": 40})
    assert not answer.message.tool_calls and "12 degrees" in answer.message.content, answer.message


def openai_tools():
    # Required: decoding is constrained to one call, valid for its schema, whatever the question.
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there!"}], tools=[WEATHER, TIME],
                                      tool_choice="required", temperature=1.0, seed=seed, max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    # A named function, streamed: the call arrives as a delta.
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What time is it in Berlin?"}], tools=[WEATHER, TIME],
                                            tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True, max_tokens=60))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_time"] and chunks[-1].choices[0].finish_reason == "tool_calls", chunks
    assert json.loads(deltas[0].function.arguments)["zone"] in ("UTC", "CET", "PST")
    # Auto: the model chooses to call; then the round trip with tool_call_id.
    msgs = weather_history(True)
    r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments) == {"city": "Paris"}, r
    msgs += [r.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": get_weather("Paris")}]
    answer = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40)
    assert answer.choices[0].finish_reason == "stop" and "12 degrees" in answer.choices[0].message.content, answer
    # "none": no call, even where the model would make one.
    r = c.chat.completions.create(model=MODEL, messages=weather_history(True), tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls", r


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


SENTENCES = ["The cat sat on the mat.", "A kitten was sitting on the rug.", "Interest rates rose sharply in the bond market."]


def ollama_embed():
    r = o.embed(model=MODEL, input=SENTENCES)
    e = r.embeddings
    assert len(e) == 3 and len(e[0]) == 576 and r.prompt_eval_count > 0, r
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in e), "L2-normalised"
    # Related sentences rank above an unrelated one.
    assert cosine(e[0], e[1]) > cosine(e[0], e[2]) and cosine(e[0], e[1]) > cosine(e[1], e[2]), (cosine(e[0], e[1]), cosine(e[0], e[2]), cosine(e[1], e[2]))
    legacy = o.embeddings(model=MODEL, prompt=SENTENCES[0]).embedding
    assert max(abs(x - y) for x, y in zip(legacy, e[0])) < 1e-5, "the legacy endpoint embeds the same way"


def openai_embeddings():
    r = c.embeddings.create(model=MODEL, input=SENTENCES[:2])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 576 and r.usage.prompt_tokens > 0, r
    one = c.embeddings.create(model=MODEL, input=SENTENCES[0]).data[0].embedding
    assert max(abs(x - y) for x, y in zip(one, r.data[0].embedding)) < 1e-5, "batched or alone, the same vector"


def ollama_model_management():
    # Pull: streamed progress up to the file's size, then success; the file is cached already, so it is only verified.
    progress = list(o.pull(MODEL, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success", progress
    sized = [p for p in progress if p.total]
    assert sized and all(p.completed <= p.total for p in sized), progress
    assert o.pull(MODEL).status == "success"
    # keep_alive: a duration shows in ps as expires_at; 0 unloads.
    import datetime
    o.generate(model=MODEL, keep_alive="10m")
    (m,) = [m for m in o.ps().models if m.model == MODEL]
    left = m.expires_at - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=9) < left <= datetime.timedelta(minutes=10, seconds=5), m.expires_at
    o.generate(model=MODEL, keep_alive=0)
    assert MODEL not in [m.model for m in o.ps().models], o.ps()
    # The next request loads it again.
    assert o.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}).done


def openai_models():
    assert MODEL in [m.id for m in c.models.list().data]


def openai_error_shape():
    try:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        assert "not found" in str(e)
        return
    raise AssertionError("expected a 404")


for name, fn in list(globals().items()):
    if callable(fn) and (name.startswith("ollama_") or name.startswith("openai_")) and fn.__module__ == "__main__":
        check(name, fn)
print(f"clients: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
