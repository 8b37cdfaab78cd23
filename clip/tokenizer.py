"""CLIP's byte-level BPE tokenizer, written out step by step.

Stable Diffusion v1 conditions its UNet on the hidden states of the CLIP
ViT-L/14 text encoder, so a prompt must be turned into exactly the integer ids
that CLIP was trained with.  This module reproduces that tokenizer.

How byte-level BPE works
------------------------
1. **Cleaning.**  The raw text is repaired with ``ftfy.fix_text`` (mojibake,
   curly quotes, ligatures, full-width letters), HTML entities are unescaped
   (twice, so ``&amp;amp;`` also becomes ``&``), whitespace runs collapse to a
   single space, and everything is lower-cased.  This is open_clip's
   ``SimpleTokenizer(clean="lower")``.

2. **Pre-tokenization.**  A regular expression cuts the text into *words*:
   runs of letters, single digits, runs of other symbols, and the English
   contractions ``'s 't 're 've 'm 'll 'd``.  Whitespace only separates words
   and never becomes a token itself.

3. **Bytes as characters.**  Each word is encoded to UTF-8, and every byte is
   replaced by one printable unicode character (:func:`bytes_to_unicode`).
   Any string -- emoji, CJK, control characters -- is therefore spelled with
   an alphabet of just 256 symbols, and nothing is ever "unknown".

4. **Merging pairs.**  The word starts as a sequence of single symbols, the
   last one carrying the end-of-word marker ``</w>`` (``"cat"`` ->
   ``c a t</w>``).  The merge list ranks symbol pairs by how frequent they were
   in CLIP's training data.  Repeatedly, the adjacent pair with the best
   (lowest) rank is fused everywhere in the word, until no adjacent pair is in
   the list: ``c a t</w>`` -> ``c at</w>`` -> ``cat</w>``.  Each resulting
   piece is one vocabulary entry, i.e. one id.  Results are cached per word
   because prompts repeat the same words again and again.

5. **Framing.**  The ids are wrapped in ``<|startoftext|>`` (49406) and
   ``<|endoftext|>`` (49407).  For the text encoder the sequence is cut or
   padded to 77 ids; SD v1 pads with the end-of-text id.

The vocabulary (49408 entries) is built from the merge file shipped next to
this module: the 256 byte symbols, the same 256 symbols with ``</w>``, the
concatenation of each of the first 48894 merges, and the two special tokens.

Textual Inversion adds *placeholder* tokens such as ``<cat-toy>`` or ``S*``
(:meth:`Tokenizer.add_token`).  They get the ids after the vocabulary
(49408, 49409, ...) and are matched in the raw text before any cleaning, so
they always stay a single token however much punctuation they contain.
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import ftfy
import regex
import torch

DEFAULT_VOCAB_PATH = Path(__file__).parent / "bpe_simple_vocab_16e6.txt.gz"

# Merges used by CLIP: the first 48894 lines after the header of the bpe file.
NUM_MERGES = 48894  # = 49152 - 256 - 2, as in OpenAI CLIP

# CLIP's pre-tokenizer (OpenAI CLIP spelling of the special tokens).
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

END_OF_WORD = "</w>"


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character.

    BPE works on strings, and the merge file is a text file, so every byte
    needs a visible, non-whitespace character to stand for it.  Bytes that
    already are printable Latin-1 characters (``!`` .. ``~``, ``¡`` .. ``¬``,
    ``®`` .. ``ÿ``; 188 of them) stand for themselves.  The remaining 68 bytes
    (control characters, space, DEL, no-break space, soft hyphen, ...) are
    given the characters ``chr(256)``, ``chr(257)``, ... in byte order.  For
    example the space byte 0x20 becomes ``Ġ`` (``chr(288)``).

    The order of the returned dict (printable bytes first, then the others)
    is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_to_char = {b: chr(b) for b in printable}
    next_code_point = 256
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(next_code_point)
            next_code_point += 1
    return byte_to_char


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """The set of adjacent symbol pairs in a word, e.g. (c, a, t) -> {(c, a), (a, t)}."""
    return set(zip(word[:-1], word[1:]))


def basic_clean(text: str) -> str:
    """Repair broken unicode with ftfy and unescape HTML entities (twice)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def clean_text(text: str) -> str:
    """The full cleaning of open_clip's ``SimpleTokenizer(clean="lower")``."""
    return whitespace_clean(basic_clean(text)).lower()


class Tokenizer:
    """CLIP's tokenizer, plus placeholder tokens for Textual Inversion.

    >>> tok = Tokenizer()
    >>> tok.encode("a photo of a dog")
    [49406, 320, 1125, 539, 320, 1929, 49407]
    >>> tok(["a photo of a dog"]).shape
    torch.Size([1, 77])
    """

    START_ID = 49406  # <|startoftext|>
    END_ID = 49407  # <|endoftext|>, also the padding id in SD v1
    context_length = 77  # positions of the CLIP text encoder

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}

        vocab = list(self.byte_encoder.values())
        vocab += [symbol + END_OF_WORD for symbol in vocab]
        vocab += ["".join(pair) for pair in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        assert self.encoder["<|startoftext|>"] == self.START_ID
        assert self.encoder["<|endoftext|>"] == self.END_ID

        # Lower rank = learned earlier = merged first.
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        # word -> space-separated BPE pieces; the special tokens are never split.
        self.cache: dict[str, str] = {
            "<|startoftext|>": "<|startoftext|>",
            "<|endoftext|>": "<|endoftext|>",
        }

        self._added_tokens: dict[str, int] = {}
        self._added_pattern: re.Pattern | None = None

    # ------------------------------------------------------------------ BPE
    def bpe(self, symbols: str) -> str:
        """Split one pre-tokenized word, written in byte symbols, into BPE pieces.

        Returns the pieces joined by spaces, e.g. ``"cats"`` -> ``"cats</w>"``
        and ``"sks"`` -> ``"sks</w>"``.
        """
        if symbols in self.cache:
            return self.cache[symbols]

        # Start from single symbols, the last one marked as the word's end; then, again and
        # again, fuse every occurrence of the adjacent pair that was merged earliest in training
        # (lowest rank), until no adjacent pair is a merge.
        pieces = tuple(symbols[:-1]) + (symbols[-1] + END_OF_WORD,)
        pairs = get_pairs(pieces)
        while pairs:
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(pieces):
                if i < len(pieces) - 1 and pieces[i] == first and pieces[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = tuple(merged)
            pairs = get_pairs(pieces)

        result = " ".join(pieces)
        self.cache[symbols] = result
        return result

    def _encode_plain(self, text: str) -> list[int]:
        """Clean, split and BPE-encode text that contains no added tokens."""
        ids: list[int] = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(symbols).split(" "))
        return ids

    # ------------------------------------------------------------ public API
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` framed by START_ID and END_ID; no padding or truncation."""
        ids = [self.START_ID]
        if self._added_pattern is None:
            ids += self._encode_plain(text)
        else:
            # re.split with a capturing group alternates: plain, token, plain, ...
            for i, piece in enumerate(self._added_pattern.split(text)):
                if i % 2 == 1:
                    ids.append(self._added_tokens[piece])
                elif piece:
                    ids += self._encode_plain(piece)
        ids.append(self.END_ID)
        return ids

    def __call__(self, texts: str | list[str], length: int = context_length) -> torch.Tensor:
        """Encode a prompt or a batch of prompts to a LongTensor of shape (B, length).

        Too long prompts are cut so that END_ID is still the last id (at most
        ``length - 2`` content tokens survive); short ones are padded with
        END_ID, as the SD v1 text encoder expects.
        """
        if length < 2:
            raise ValueError(f"length must be at least 2 (start and end ids), got {length}")
        if isinstance(texts, str):
            texts = [texts]
        batch = torch.full((len(texts), length), self.END_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.END_ID
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return batch

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Turn ids back into text; special ids are skipped, ``</w>`` becomes a space.

        Cleaning is lossy, so this gives the lower-cased, re-spaced text
        (``"Hello, World!"`` decodes to ``"hello , world !"``).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        added_by_id = {i: token for token, i in self._added_tokens.items()}
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in (self.START_ID, self.END_ID):
                continue
            if i in added_by_id:
                out += added_by_id[i].encode("utf-8") + b" "
                continue
            if i not in self.decoder:
                raise ValueError(f"unknown token id {i} (tokenizer has {len(self)} ids)")
            piece = self.decoder[i]
            end_of_word = piece.endswith(END_OF_WORD)
            if end_of_word:
                piece = piece[: -len(END_OF_WORD)]
            out += bytes(self.byte_decoder[char] for char in piece)
            if end_of_word:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()

    def word_id(self, word: str) -> int | None:
        """The id of ``word`` if it encodes to exactly one token, else None.

        Used to check that an initializer word (e.g. ``"object"``) is a single
        token whose embedding can seed a new placeholder.
        """
        ids = self.encode(word)[1:-1]
        return ids[0] if len(ids) == 1 else None

    def num_tokens(self, text: str) -> int:
        """Number of content tokens in ``text`` (start and end ids not counted)."""
        return len(self.encode(text)) - 2

    def add_token(self, token: str) -> int:
        """Register a placeholder token (``<cat-toy>``, ``S*``, ...) and return its id.

        New tokens get the ids 49408, 49409, ... in the order they are added;
        adding the same token again returns its existing id.  A placeholder is
        matched exactly (case-sensitive, longest first) in the raw text, so it
        stays one token regardless of punctuation or spaces inside it.
        """
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        if not token.strip():
            raise ValueError("cannot add an empty (or whitespace-only) token")
        if token in self._added_tokens:
            return self._added_tokens[token]
        existing = self.word_id(token)
        if existing is not None:
            raise ValueError(
                f"{token!r} is already a word in the vocabulary; choose a placeholder "
                f"that is not (it encodes to the single id {existing})"
            )
        new_id = len(self)
        self._added_tokens[token] = new_id
        by_length = sorted(self._added_tokens, key=len, reverse=True)
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        return new_id

    @property
    def added_tokens(self) -> dict[str, int]:
        """The placeholder tokens added so far, token -> id (a copy)."""
        return dict(self._added_tokens)

    def __len__(self) -> int:
        return len(self.encoder) + len(self._added_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab={len(self.encoder)}, added={len(self._added_tokens)})"
