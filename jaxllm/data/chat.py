"""Chat records as token ids with an assistant mask: the tokens supervised fine-tuning
trains on.

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` or
`{"prompt": str, "response": str}` (one user turn, then one assistant turn). `render` returns
a conversation's ids and, per token, whether it is assistant text:

- A tokenizer with a chat template renders the whole conversation through it, sandboxed
  (`tokenizer.render_chat`). Where the template marks assistant text with
  `{% generation %} ... {% endgeneration %}` blocks, that text is the assistant's, as in
  `transformers`. Otherwise assistant turn i is the text that rendering turns 0..i adds to
  rendering turns 0..i-1 with the generation prompt: its content and end-of-turn tokens, not
  its header. A template whose earlier turns change once later turns follow is refused.
  A token that overlaps assistant text is an assistant token.
- Any other tokenizer renders the plain format: `<bos>`, then each turn as `Role: content`,
  ended by a newline, or by `<eos>` for an assistant turn. The assistant's content and its
  `<eos>` are assistant tokens; each piece is tokenized on its own.
"""

import re

from jaxllm.data.tokenizer import Tokenizer, render_chat

ROLES = ("system", "user", "assistant")
_MARKS = ("\ue000", "\ue001")  # private-use characters around `{% generation %}` text
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def conversation(record, *, messages_key: str = "messages", prompt_key: str = "prompt",
                 response_key: str = "response") -> list[dict]:
    """The messages of a record, checked; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not {type(record).__name__}")
    if messages_key in record:
        return _checked_messages(record[messages_key], messages_key)
    if prompt_key in record or response_key in record:
        for key in (prompt_key, response_key):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{key!r} must be a string, got {record.get(key)!r}")
        return [{"role": "user", "content": record[prompt_key]},
                {"role": "assistant", "content": record[response_key]}]
    raise ValueError(f"has neither {messages_key!r} nor {prompt_key!r} and {response_key!r}")


def _checked_messages(messages, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{key!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{key}[{i}] has role {_role(message)!r}, not one of {list(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{key}[{i}] has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{key!r} has no assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _role(message):
    return message.get("role") if isinstance(message, dict) else message


def render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """The ids of a conversation and, per id, whether it is an assistant token."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return _render_plain(tokenizer, messages)
    if _GENERATION_TAG.search(template):
        text, spans = _generation_spans(tokenizer, messages)
    else:
        text, spans = _prefix_spans(tokenizer, messages)
    ids, offsets = tokenizer.encode_offsets(text)
    return ids, _overlapping(offsets, spans)


def generation_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids of `messages`, then the header of the assistant's turn: what a model continues
    with its response (the chat template's generation prompt, or `Assistant: `)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return _render_plain(tokenizer, messages)[0] + tokenizer.encode("Assistant: ")
    return tokenizer.encode(_template(tokenizer, messages, add_generation_prompt=True))


def _render_plain(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    ids, mask = [tokenizer.bos_id], [False]
    for message in messages:
        header = tokenizer.encode(f"{message['role'].capitalize()}: ")
        content = tokenizer.encode(message["content"])
        assistant = message["role"] == "assistant"
        end = [tokenizer.eos_id] if assistant else tokenizer.encode("\n")
        ids += header + content + end
        mask += [False] * len(header) + [assistant] * (len(content) + len(end))
    return ids, mask


def _template(tokenizer, messages: list[dict], *, add_generation_prompt: bool,
              generation_marks: tuple[str, str] = ("", "")) -> str:
    import jinja2

    try:
        return render_chat(tokenizer.chat_template, messages,
                           add_generation_prompt=add_generation_prompt,
                           generation_marks=generation_marks, **tokenizer.chat_tokens)
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template: {error}") from None


def _generation_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) characters of its `{% generation %}` blocks."""
    if any(mark in m["content"] for m in messages for mark in _MARKS):
        raise ValueError("a message holds a private-use character U+E000 or U+E001")
    marked = _template(tokenizer, messages, add_generation_prompt=False, generation_marks=_MARKS)
    text, spans, start = [], [], 0
    for piece in re.split(f"({'|'.join(_MARKS)})", marked):
        if piece == _MARKS[0]:
            start = sum(map(len, text))
        elif piece == _MARKS[1]:
            spans.append((start, sum(map(len, text))))
        else:
            text.append(piece)
    return "".join(text), spans


def _prefix_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the characters each assistant turn adds to the prefix before it."""
    full = _template(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True)
        through = _template(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"the chat template renders assistant turn {i} differently once other turns "
                "follow; mark assistant text in it with {% generation %} ... "
                "{% endgeneration %}"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token of these character offsets, whether it overlaps one of the (sorted) spans."""
    return [any(start < span_end and end > span_start for span_start, span_end in spans)
            for start, end in offsets]
