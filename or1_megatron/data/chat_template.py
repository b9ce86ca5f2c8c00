"""DeepSeek-R1-Distill's chat format: special tokens, the Jinja template, and a Python renderer.

Owns the prompt format of OR1's base models: `<｜begin▁of▁sentence｜>{system}<｜User｜>{q}<｜Assistant｜>`
and, for generation, the assistant turn opened with `<think>\\n`. Earlier assistant turns keep only
the text after `</think>` (as the released template does). The Jinja template (for Hugging Face
tokenizers) and `render_chat` (pure Python) must agree; a test checks they do.
"""
from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
GENERATION_PREFIX = ASSISTANT + THINK_OPEN + "\n"

CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '" + THINK_CLOSE + "' in content %}{% set content = content.split('" + THINK_CLOSE + "')[-1] %}{% endif %}"
    "{{ '" + ASSISTANT + "' + content + '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + THINK_OPEN + "\\n' }}{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, identical to the Jinja template's output."""
    # The template keeps the last system message only.
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = systems[-1] if systems else ""
    parts = [BOS, system]
    for message in messages:
        if message["role"] == "user":
            parts.append(USER + message["content"])
        elif message["role"] == "assistant":
            parts.append(ASSISTANT + message["content"].split(THINK_CLOSE)[-1] + EOS)
    if add_generation_prompt:
        parts.append(GENERATION_PREFIX)
    return "".join(parts)
