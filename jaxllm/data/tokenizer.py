"""Tokenizers behind one interface: byte-level, Hugging Face `tokenizer.json`, SentencePiece.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `pad_id`,
`bos_id`, `eos_id`, and `special`: the special-token strings it knows, mapped to their ids.
Special-token strings in the text, such as "<think>", encode to their single id and decode back.
"""

import re
from pathlib import Path
from typing import Protocol

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>")

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
    """A `tokenizer.json` file, read by the `tokenizers` package."""

    def __init__(self, path: str | Path):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self.special = _find_special(self._tokenizer.token_to_id)
        self.pad_id, self.bos_id, self.eos_id = _control_ids(self.special, path)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


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
