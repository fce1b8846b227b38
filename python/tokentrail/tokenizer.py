"""Text <-> token ids, through the `tokenizers` library for every format."""
from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable, Iterator

import tokenizers

from .errors import CheckpointError


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the facts generation needs.

    `add_bos` prepends the BOS id when encoding a prompt, for models whose
    tokenizer.json does not do it in its own post-processor.
    """

    def __init__(self, inner: tokenizers.Tokenizer, bos_id: int | None = None,
                 eos_ids: Iterable[int] = (), add_bos: bool = False):
        self.inner = inner
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = add_bos
        self.source = None  # the file it was read from, for messages
        # The model's chat template (tokentrail.chat.ChatTemplate), when the checkpoint has one.
        self.chat_template = None

    @classmethod
    def from_file(cls, path, **kw) -> "Tokenizer":
        """A tokenizer.json; a file the tokenizers library cannot build from is a CheckpointError."""
        from .loading.fields import MAX_JSON_BYTES, open_regular

        with open_regular(path, "tokenizer.json") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
        try:
            if len(data) > MAX_JSON_BYTES:
                raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
            inner = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except BaseException as e:  # its own exception types, and a Rust panic (a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            # The library's message may quote the file; only where it failed is repeated.
            where = re.search(r"line \d+ column \d+", str(e))
            raise CheckpointError("tokenizer.json is not a tokenizer the tokenizers library can build"
                                  + (f" (at {where.group(0)})" if where else ""), path=path) from None
        tok = cls(inner, **kw)
        tok.source = path
        tok.probe()
        return tok

    # A sample of what tokenizers meet: ASCII, accents, CJK, emoji, whitespace runs.
    PROBE_TEXT = "Hello, world! 12 345 \t\n  caf\u00e9 \u00fcber \u4f60\u597d \U0001f600 <s> </s>"

    def probe(self) -> None:
        """Encode a sample and decode every id once, so a malformed tokenizer fails at load."""
        self.decode(self.encode(self.PROBE_TEXT))
        self.decode(range(self.vocab_size), skip_special=False)

    def _call(self, what: str, fn, *args, **kw):
        """Run the library; its failures (a Rust panic is a BaseException) become a CheckpointError."""
        try:
            return fn(*args, **kw)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"the tokenizer failed while {what} ({type(e).__name__}); its "
                                  f"definition is malformed", path=self.source) from None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Ids of `text`; with `special`, the model's BOS and template tokens too."""
        ids = self._call("encoding", self.inner.encode, text, add_special_tokens=special).ids
        if special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._call("decoding", self.inner.decode, list(ids), skip_special_tokens=skip_special)

    def piece(self, token_id: int) -> str:
        """The token's own vocabulary entry, for tables (e.g. 'Ġis' or '▁is')."""
        p = self.inner.id_to_token(int(token_id))
        return p if p is not None else f"<{token_id}>"

    def display(self, token_id: int) -> str:
        """The text a token stands for, as a reader would see it.

        A token holding only part of a character's UTF-8 bytes shows those
        bytes as escapes (``<0xE6>``) instead of the replacement character.
        """
        text = self.decode([int(token_id)], skip_special=False)
        if not text:
            # A lone sentencepiece word boundary decodes to nothing: show it as the space it is.
            return self.piece(token_id).replace("\u2581", " ")
        if "\ufffd" in text:
            raw = self.token_bytes(token_id)
            if raw is not None:
                text = raw.decode("utf-8", errors=_BYTE_ESCAPES)
        # Sentencepiece-style decoders drop a word's leading space when it is decoded alone.
        if self.piece(token_id).startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for, when the vocabulary says so (byte-fallback
        pieces like ``<0xE6>`` or byte-level BPE pieces); None for other tokens."""
        piece = self.piece(token_id)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        if type(self.inner.decoder).__name__ == "ByteLevel":
            table = _byte_level_table()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return None

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


def _escape_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in err.object[err.start:err.end]), err.end


_BYTE_ESCAPES = "tokentrail-byte-escapes"
codecs.register_error(_BYTE_ESCAPES, _escape_bytes)


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte -> the byte.

    Printable Latin-1 bytes stand for themselves; the others (controls, space,
    soft hyphen...) are mapped in order to U+0100 onwards.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces.

    Decoding each token alone breaks characters whose bytes span several
    tokens and drops the spaces some tokenizers restore only in context, so
    the decoder re-decodes a short window and emits only what is final: text
    that does not end in a half-finished character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, context: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self.emitted = len(self.tokenizer.decode(self.ids))

    # Ids kept as context once text is final: enough for spacing and joins,
    # and it keeps each step's re-decode short however long the stream gets.
    WINDOW = 32

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        if len(self.ids) > 2 * self.WINDOW:
            self.ids = self.ids[-self.WINDOW:]
            self.emitted = len(self.tokenizer.decode(self.ids))
        return piece

    def feed(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            piece = self.push(i)
            if piece:
                yield piece
