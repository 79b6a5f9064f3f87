"""Chat templates and the character spans of the text the loss should cover.

The spans are derived by rendering prefixes of the conversation rather than by searching the
text for role markers: the template is the only authority on where an assistant turn begins and
ends, so asking it (``prefix + generation prompt`` vs ``prefix + reply``) is correct for any
template that is prefix-stable, and a template that is not (one that rewrites earlier turns when
later ones are added) is reported instead of producing a silently wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignkit.errors import DataError

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token or '' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    # Stanford Alpaca's prompt; the reply ends with the tokenizer's EOS so the model learns to stop.
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\\n\\n' }}{% set loop_messages = messages[1:] %}"
        "{% else %}"
        "{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\\n\\n' }}"
        "{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + (eos_token or '') + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


@dataclass
class Rendered:
    """A rendered training text and the [start, end) character spans that carry the loss."""

    text: str
    spans: list[tuple[int, int]]


def resolve_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The Jinja source to use: a named template, a Jinja string, the tokenizer's, or chatml."""
    own = getattr(tokenizer, "chat_template", None)
    if chat_template:
        if chat_template in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[chat_template]
        if isinstance(own, dict) and chat_template in own:  # the tokenizer's own named templates
            return own[chat_template]
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        raise DataError(
            f"unknown chat template '{chat_template}'",
            hint=f"model.chat_template is one of {', '.join(NAMED_TEMPLATES)} or a Jinja string",
        )
    if isinstance(own, dict):  # several named templates: the "default" one renders chats
        own = own.get("default")
    return own if isinstance(own, str) and own else NAMED_TEMPLATES["chatml"]


def render_messages(
    tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=template,
        )
    except (
        Exception
    ) as exc:  # jinja2 raises TemplateError and also plain errors from `raise_exception`
        raise DataError(
            f"the chat template refused this conversation ({exc})",
            hint="fix the turn order for this template, or set model.chat_template",
        ) from None


def render_conversation(
    messages: list[dict[str, str]], tokenizer: Any, chat_template: str | None = None
) -> Rendered:
    """Render a conversation and find each assistant turn's span (reply + end-of-turn token).

    For assistant turn i, the text between ``template(messages[:i], generation prompt)`` and
    ``template(messages[:i+1])`` is the reply as the model must produce it; trailing whitespace
    after the end-of-turn token is left out because the model never has to predict it (the next
    turn's prompt supplies it).
    """
    template = resolve_template(tokenizer, chat_template)
    text = render_messages(tokenizer, messages, template, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_messages(tokenizer, messages[:i], template, generation_prompt=True)
        upto = render_messages(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise DataError(
                f"the chat template is not prefix-stable at message {i}: rendering the "
                "conversation up to a reply does not start the full rendering",
                hint="such templates rewrite earlier turns (e.g. drop reasoning); set "
                "model.chat_template to chatml, llama3, alpaca or a Jinja string",
            )
        reply = upto[len(prefix) :].rstrip()
        spans.append((len(prefix), len(prefix) + len(reply)))
    return Rendered(text, spans)


def render_text(text: str, tokenizer: Any) -> Rendered:
    """Plain text: the whole text plus EOS is the target (EOS teaches the model to stop)."""
    eos = tokenizer.eos_token or ""
    full = text + eos
    return Rendered(full, [(0, len(full))])
