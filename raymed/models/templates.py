"""Conversation templates of the LLaVA family, as data (`model.template`).

A template turns (question, answer) into a prompt (with one `<image>` placeholder) and an answer target. Training
labels cover the answer and its end token only; evaluation and inference use the same prompt.

- `plain`: `USER: <image>\\n{q} ASSISTANT:` + ` {a}</s>`, what raymed's tiny presets were pretrained with.
- `llava-med-v1.5`: LLaVA-Med v1.5's `mistral_instruct` (`llava/conversation.py`, LLaMA-2 style, empty system
  prompt): `<s>[INST] <image>\\n{q} [/INST]` + ` {a}</s>`.
- `llava-med-v1.0`: LLaVA-Med v1.0's `simple` conversation (system prompt, one greeting exchange, `###` separators):
  `...###Human: <image>\\n{q}###Assistant:` + ` {a}###` (no `</s>`: v1.0 stops on `###`).
- A conversation's later turns repeat the prompt without its image (`plain`: `USER: {q} ASSISTANT:`, v1.5:
  `[INST] {q} [/INST]`), v1.0's without its system prompt and greeting (`Human: {q}###Assistant:`), each after the
  previous answer and its end token, as the templates' own multi-turn conversations do.
- `auto`: the model directory's chat template when it has one (the converter writes LLaVA-Med v1.5's), else `plain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE = "<image>"


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # `{question}` and one `<image>`; the text after BOS
    answer: str = " {answer}"  # the target text; the end token follows when `eos`
    bos: bool = True
    eos: bool = True
    stop: str | None = None  # text that ends an answer in generation (besides the end token)
    turn: str | None = None  # a later turn's prompt (`{question}`, no image); default: `prompt` without its image

    def render(self, question: str, answer: str | None = None, *, first: bool = True,
               image: bool = True) -> tuple[str, str]:
        """(prompt text, answer text); `str.replace`, so braces in questions are safe. A conversation's later turns
        (`first=False`) use `turn`; a turn without an image drops the `<image>` line."""
        prompt = self.prompt if first else (self.turn if self.turn is not None else self.prompt)
        if not (first and image):
            prompt = prompt.replace(IMAGE + "\n", "").replace(IMAGE, "")
        prompt = prompt.replace("{question}", question)
        return prompt, (self.answer.replace("{answer}", answer) if answer is not None else "")


V10_SYSTEM = (
    "You are LLaVA-Med, a large language and vision assistant trained by a group of researchers at Microsoft, "
    "based on the general domain LLaVA architecture. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of medical and clinical tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail."
)
TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "USER: <image>\n{question} ASSISTANT:"),
    "llava-med-v1.5": Template("llava-med-v1.5", "[INST] <image>\n{question} [/INST]"),
    "llava-med-v1.0": Template(
        "llava-med-v1.0",
        V10_SYSTEM + "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###Human: <image>\n{question}"
        "###Assistant:",
        answer=" {answer}###", eos=False, stop="###", turn="Human: {question}###Assistant:"),
}
TEMPLATE_NAMES = ("auto", *TEMPLATES)

# The `plain` template as a chat template, so processors of the tiny presets carry it as data.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:"
    "{% elif message['role'] == 'assistant' %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


def from_chat_template(processor: Any) -> Template:
    """The processor's chat template as a Template (rendered once with sentinels for question and answer)."""
    q, a = "\x00QUESTION\x00", "\x00ANSWER\x00"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": a}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template([user, reply], tokenize=False)
    if not full.startswith(prompt) or prompt.count(IMAGE) != 1 or q not in prompt or a not in full[len(prompt):]:
        raise ValueError("the model directory's chat template does not render one user turn with one <image> "
                         "followed by the answer; set model.template to a named template "
                         f"({', '.join(TEMPLATES)})")
    answer = full[len(prompt):]
    tok = processor.tokenizer
    bos = prompt.startswith(tok.bos_token)
    eos = answer.endswith(tok.eos_token)
    prompt = prompt[len(tok.bos_token):] if bos else prompt
    answer = answer[: -len(tok.eos_token)] if eos else answer
    return Template("chat_template", prompt.replace(q, "{question}"), answer.replace(a, "{answer}"), bos, eos)


def resolve_template(name: str, processor: Any) -> Template:
    """A named template, or for `auto` the processor's chat template (else `plain`)."""
    if name == "auto":
        return from_chat_template(processor) if getattr(processor, "chat_template", None) else TEMPLATES["plain"]
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}") from None
