"""Tokenizers behind one interface: byte-level, Hugging Face `tokenizer.json`, SentencePiece.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `pad_id`,
`bos_id`, `eos_id`, and `special`: the special-token strings it knows, mapped to their ids.
Special-token strings in the text, such as "<think>", encode to their single id and decode back.

A Hugging Face tokenizer also reads the `tokenizer_config.json` (or `chat_template.jinja`)
beside its `tokenizer.json`: its bos/eos/pad tokens and its chat template, which
`render_chat` renders in a sandboxed Jinja environment, as `transformers` does.
"""

import datetime
import json
import re
from pathlib import Path
from typing import Protocol

SPECIAL_TOKENS = (
    "<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>",
    "<tool>", "</tool>", "<result>", "</result>",  # a tool call inside a thought, its output
    "<effort:instant>", "<effort:low>", "<effort:medium>", "<effort:high>",  # effort control
    "<image>", "</image>", "<patch>",  # an image span: <image>, one <patch> a patch, </image>
)

# Other spellings of the control tokens in common pretrained vocabularies.
_ALIASES = {
    "<pad>": ("<pad>", "<|pad|>", "[PAD]"),
    "<bos>": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "<eos>": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
}


class Tokenizer(Protocol):
    """What sources, samplers and verifiers use of a tokenizer."""

    special: dict[str, int]
    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255; the special tokens follow from 256."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.pad_id = self.special["<pad>"]
        self.bos_id = self.special["<bos>"]
        self.eos_id = self.special["<eos>"]
        self._names = {i: name for name, i in self.special.items()}
        self._pattern = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special)

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, piece in enumerate(self._pattern.split(text)):
            ids += [self.special[piece]] if i % 2 else list(piece.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        out, pending = [], bytearray()
        for i in map(int, ids):
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            out.append(self._names.get(i, ""))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HuggingFaceTokenizer:
    """A `tokenizer.json` file, read by the `tokenizers` package, with the control tokens
    and chat template of the `tokenizer_config.json` beside it, if any.

    A vocabulary without a bos token (Qwen) starts documents with its eos token.
    """

    def __init__(self, path: str | Path):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        settings = _tokenizer_config(Path(path).parent)
        self.special = _find_special(self._tokenizer.token_to_id)
        for name in ("bos", "eos", "pad"):
            token = _token_text(settings.get(f"{name}_token"))
            if token is not None and self._tokenizer.token_to_id(token) is not None:
                self.special[f"<{name}>"] = self._tokenizer.token_to_id(token)
        if "<eos>" in self.special:
            self.special.setdefault("<bos>", self.special["<eos>"])
        self.pad_id, self.bos_id, self.eos_id = _control_ids(self.special, path)
        self.chat_template = settings.get("chat_template")
        texts = {f"{name}_token": _token_text(settings.get(f"{name}_token"))
                 for name in ("bos", "eos", "pad", "unk")}
        # The template sees the tokens that are set, as in transformers.
        self.chat_tokens = {k: v for k, v in texts.items() if v is not None}

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` and, for each, the [start, end) characters of `text` it covers."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets


class SentencePieceTokenizer:
    """A SentencePiece `.model` file. The reasoning tags should be user-defined symbols."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self._model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        controls = {"<pad>": self._model.pad_id(), "<bos>": self._model.bos_id(),
                    "<eos>": self._model.eos_id()}
        found = _find_special(self._piece_id)
        self.special = {**found, **{name: i for name, i in controls.items() if i >= 0}}
        self.pad_id, self.bos_id, self.eos_id = _control_ids(self.special, path)

    def _piece_id(self, piece: str) -> int | None:
        i = self._model.piece_to_id(piece)
        return None if i == self._model.unk_id() else i

    @property
    def vocab_size(self) -> int:
        return self._model.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._model.encode(text)

    def decode(self, ids) -> str:
        # Control tokens (bos/eos/pad) decode to nothing in SentencePiece; spell them out.
        names = {i: name for name, i in self.special.items()}
        out, pending = [], []
        for i in map(int, ids):
            if i in names and self._model.is_control(i):
                out += [self._model.decode(pending), names[i]]
                pending = []
            else:
                pending.append(i)
        return "".join(out + [self._model.decode(pending)])


def _token_text(token) -> str | None:
    """A token of tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json of `directory` ({} if none), its chat template resolved: a
    `chat_template.jinja` file wins; of a list of named templates, "default" is taken."""
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        settings["chat_template"] = named.get("default")
    if (directory / "chat_template.jinja").is_file():
        settings["chat_template"] = (directory / "chat_template.jinja").read_text()
    return settings


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                generation_marks: tuple[str, str] = ("", ""), **tokens) -> str:
    """The chat template rendered in Jinja's immutable sandbox (no access to Python
    internals), in the conventions of `transformers`: its `tojson` (no HTML escaping, no
    ASCII escapes) and `strftime_now`, and `tools` and `documents` None. The text of each
    `{% generation %}` block, which marks assistant text, is put between
    `generation_marks`."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    extensions = [jinja2.ext.loopcontrols, _generation_extension(*generation_marks)]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=extensions)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=add_generation_prompt, **tokens)


def _generation_extension(start: str, end: str):
    """The Jinja extension of `{% generation %} ... {% endgeneration %}` blocks: each renders
    its text between `start` and `end`."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_marked", [])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _marked(self, caller) -> str:
            return f"{start}{caller()}{end}"

    return Generation


def chat_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a prompt `text`: one user message through the tokenizer's chat template
    when it has one, else `<bos>` and the text."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return [tokenizer.bos_id, *tokenizer.encode(text)]
    messages = [{"role": "user", "content": text}]
    return tokenizer.encode(render_chat(template, messages, **tokenizer.chat_tokens))


def _find_special(token_to_id) -> dict[str, int]:
    """The SPECIAL_TOKENS a vocabulary holds, under their own names or a common alias."""
    special = {}
    for name in SPECIAL_TOKENS:
        for spelling in _ALIASES.get(name, (name,)):
            if (i := token_to_id(spelling)) is not None:
                special[name] = i
                break
    return special


def _control_ids(special: dict[str, int], path) -> tuple[int, int, int]:
    """(pad, bos, eos); pad falls back to eos, which must exist, as must bos."""
    for name in ("<bos>", "<eos>"):
        if name not in special:
            raise ValueError(f"{path}: the vocabulary has no {name} token "
                             f"(looked for {', '.join(_ALIASES[name])})")
    return special.get("<pad>", special["<eos>"]), special["<bos>"], special["<eos>"]


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer `spec` names: "byte", a `tokenizer.json` or a SentencePiece `.model` path."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    kinds = {".json": HuggingFaceTokenizer, ".model": SentencePieceTokenizer}
    if path.suffix not in kinds:
        raise ValueError(f"{spec!r} is neither 'byte', a tokenizer.json nor a SentencePiece .model")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist")
    return kinds[path.suffix](path)
