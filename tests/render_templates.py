#!/usr/bin/env python3
"""Writes tests/data/templates/*.expected: a tool conversation rendered by
each template exactly as HF transformers' `apply_chat_template` renders it
(jinja2's sandbox with trim_blocks and lstrip_blocks, `tojson` as Python's
`json.dumps`). `tests/tokenizer.rs` checks sollol's renderer against them.

usage: python3 tests/render_templates.py   (needs jinja2)
"""
import json
import pathlib

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = pathlib.Path(__file__).parent / "data" / "templates"
SPECIAL = {
    "qwen2.5": ("", "<|im_end|>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-nemo": ("<s>", "</s>"),
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}}, "required": ["city"]}}}]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "12 degrees", "tool_call_id": "abcDEF123", "name": "get_weather"},
    {"role": "assistant", "content": "It is 12 degrees."},
    {"role": "user", "content": "And in Oslo?"},
]


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


for name, (bos, eos) in SPECIAL.items():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    template = env.from_string((HERE / f"{name}.jinja").read_text())
    text = template.render(messages=MESSAGES, tools=TOOLS, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    (HERE / f"{name}.expected").write_text(text)
    print(f"{name}: {len(text)} characters")
