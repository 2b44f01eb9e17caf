"""Byte-level tokenizer with the special tokens the reasoning format uses."""

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>")


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255; special tokens follow from 256."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.pad_id = self.special["<pad>"]
        self.bos_id = self.special["<bos>"]
        self.eos_id = self.special["<eos>"]

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        names = {i: name for name, i in self.special.items()}
        out, pending = [], bytearray()
        for i in map(int, ids):
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            out.append(names.get(i, ""))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)
