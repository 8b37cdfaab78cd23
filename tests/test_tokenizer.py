"""Tests for clip/tokenizer.py (CLIP byte-level BPE + placeholder tokens)."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip.tokenizer import DEFAULT_VOCAB_PATH, Tokenizer, bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_cases.json").read_text("utf-8"))
CASES = FIXTURE["cases"]
START, END = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A shared tokenizer WITHOUT added tokens; tests must not add tokens to it."""
    return Tokenizer()


# --------------------------------------------------------------------------- vocabulary


def test_vocab_layout(tok):
    assert len(tok) == FIXTURE["special_ids"]["vocab_size"] == 49408
    assert Tokenizer.START_ID == START and Tokenizer.END_ID == END
    assert Tokenizer.context_length == 77
    assert tok.decoder[START] == "<|startoftext|>" and tok.decoder[END] == "<|endoftext|>"
    # 256 byte symbols, then the same with </w>, then merges
    assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>"
    assert tok.decoder[512] == "in"  # first merge "i n"
    assert tok.added_tokens == {}


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    chars = list(table.values())
    assert len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ"


def test_plain_text_vocab_file_gives_same_ids(tmp_path, tok):
    plain = tmp_path / "bpe.txt"
    plain.write_bytes(gzip.decompress(DEFAULT_VOCAB_PATH.read_bytes()))
    other = Tokenizer(plain)
    text = "a photo of a sks dog, 東京 🐱"
    assert other.encode(text) == tok.encode(text)


def test_build_is_fast():
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        Tokenizer()
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0, f"building the tokenizer took {best:.2f}s"


def test_import_does_not_read_vocab():
    # Load clip/tokenizer.py on its own (not through clip/__init__.py) in a fresh interpreter
    # and record every file it opens.
    code = (
        "import sys, importlib.util\n"
        "opened = []\n"
        "sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == 'open' else None)\n"
        "spec = importlib.util.spec_from_file_location('clip_tokenizer', 'clip/tokenizer.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "hits = [p for p in opened if 'bpe_simple_vocab' in p]\n"
        "assert not hits, hits\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------- fixture cases


@pytest.mark.parametrize("case", CASES, ids=[c["note"][:40] for c in CASES])
def test_fixture_ids(tok, case):
    ids = tok.encode(case["text"])
    assert ids == case["ids"]
    assert len(ids) == case["num_ids"]
    assert tok.num_tokens(case["text"]) == case["num_ids"] - 2
    assert [tok.decoder[i] for i in ids[1:-1]] == case["tokens"]


def test_fixture_has_all_cases():
    assert len(CASES) == 30


def test_fixture_padding_and_truncation(tok):
    for case in CASES:
        row = tok(case["text"])[0].tolist()
        assert len(row) == 77
        if "ids_truncated_77" in case:
            assert len(case["ids"]) > 77
            assert row == case["ids_truncated_77"]
        else:
            assert row == case["ids"] + [END] * (77 - len(case["ids"]))
    assert tok("a photo of a sks dog")[0].tolist() == FIXTURE["padding"]["example_sd_v1_padded_hf"]


def test_call_shapes_and_truncation(tok):
    batch = tok(["a photo of a dog", "", "a photograph of an astronaut riding a horse"])
    assert batch.shape == (3, 77) and batch.dtype == torch.long
    assert tok("a photo of a dog").shape == (1, 77)
    assert torch.equal(tok("a photo of a dog")[0], batch[0])
    assert batch[1].tolist() == [START] + [END] * 76

    ids = tok.encode("a photograph of an astronaut riding a horse")  # 10 ids
    short = tok("a photograph of an astronaut riding a horse", length=6)[0].tolist()
    assert short == ids[:5] + [END]  # length - 2 = 4 content tokens kept
    assert tok("a photo", length=4)[0].tolist() == [START, 320, 1125, END]  # exact fit
    assert tok("a photo", length=2)[0].tolist() == [START, END]
    with pytest.raises(ValueError):
        tok("a photo", length=1)


def test_encode_does_not_truncate(tok):
    long_case = next(c for c in CASES if "ids_truncated_77" in c)
    assert tok.encode(long_case["text"]) == long_case["ids"]
    assert tok.num_tokens(long_case["text"]) == len(long_case["ids"]) - 2 > 75


# --------------------------------------------------------------------------- HF reference


WORDS = (
    "a photo of the dog cat toy beach painting portrait highly detailed render sunset castle "
    "astronaut horse riding in on with by trending artstation octane unreal engine 8k bokeh "
    "masterpiece quality sks xyzzy qwertyuiop antidisestablishmentarianism photorealistic "
    "watercolor cyberpunk steampunk neon hello world"
).split()
CONTRACTIONS = ["don't", "won't", "it's", "we're", "they've", "I'm", "you'll", "he'd",
                "CAN'T", "'s", "'t", "O'Neil", "rock'n'roll", "''", "'"]
PUNCT = list(",.!?;:-()[]{}\"'*#@/\\_+=~^%$|`") + ["...", "--", "!!", "?!", "(((", ")))", ":1.2)", "::"]
UNICODE = ["café", "naïve", "Ångström", "Straße", "München", "Москва", "Ελλάδα", "東京", "タワー",
           "夜景", "한국어", "العربية", "हिन्दी", "ñ", "ø", "œ", "Ω", "e\u0301", "ﬁne", "ｆｕｌｌ",
           "“quoted”", "‘single’", "cafÃ©", "Ã¼ber", "µ", "½", "²", "™", "©", "→", "∞", "√"]
EMOJI = ["🐱", "🐶", "❤️", "❤", "👍🏽", "👨‍👩‍👧", "🇯🇵", "✨", "🎨", "🔥🔥", "😀😃"]
SPACES = [" ", "  ", "\t", "\n", " \n ", "\u00a0", "\u3000", "\u2009", "\r\n"]
CODEPOINT_RANGES = [(0x00C0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x3040, 0x30FF),
                    (0x4E00, 0x4FFF), (0x2190, 0x22FF), (0x1F300, 0x1F5FF)]


def random_number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randrange(10**rng.randrange(1, 8)))
    if kind == 1:
        return f"{rng.uniform(0, 100):.{rng.randrange(1, 4)}f}"
    if kind == 2:
        return f"{rng.randrange(10**7):,}"
    return f"{rng.randrange(1, 99)}{rng.choice(['st', 'nd', 'rd', 'th', 'px', 'k', '%'])}"


def random_piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.40:
        word = rng.choice(WORDS)
        return rng.choice([word, word, word.title(), word.upper()])
    if kind < 0.50:
        return rng.choice(CONTRACTIONS)
    if kind < 0.62:
        return rng.choice(PUNCT)
    if kind < 0.72:
        return random_number(rng)
    if kind < 0.84:
        return rng.choice(UNICODE)
    if kind < 0.92:
        return rng.choice(EMOJI)
    lo, hi = rng.choice(CODEPOINT_RANGES)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4)))


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 14)):
        parts.append(random_piece(rng))
        parts.append(rng.choice([" "] * 6 + [""] * 2 + SPACES))
    if rng.random() < 0.3:
        parts.insert(0, rng.choice(SPACES))
    return "".join(parts)


def hf_slow_normalize(text: str) -> str:
    """The slow HF CLIPTokenizer's cleaning: ftfy.fix_text -> collapse whitespace -> lower()."""
    import ftfy

    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A transformers CLIPTokenizer built from vocab.json/merges.txt made from the same BPE file.

    Returns ``text -> ids`` that behaves like the slow CLIPTokenizer with ftfy active
    (the tokenizer used by SD v1 / diffusers).
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("ftfy")

    lines = gzip.decompress(DEFAULT_VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")

    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert len(hf) == 49408

    if hasattr(hf, "fix_text"):
        # transformers 4.x: CLIPTokenizer is the slow Python tokenizer. It uses ftfy only if
        # ftfy is importable, otherwise it falls back to BERT's BasicTokenizer (different ids).
        assert hf.fix_text is not None, "slow CLIPTokenizer is not using ftfy"
        return lambda text: hf(text)["input_ids"]

    # transformers >= 5: CLIPTokenizer is the `tokenizers` (Rust) implementation, whose
    # normalizer is NFC + whitespace + lowercase, without ftfy. Show that, then put the slow
    # tokenizer's ftfy cleaning in front of it so the reference is the SD v1 tokenizer again.
    curly = "“smart quotes”"
    assert hf(curly)["input_ids"] != hf(hf_slow_normalize(curly))["input_ids"]
    return lambda text: hf(hf_slow_normalize(text))["input_ids"]


def test_matches_hf_reference_on_random_text(tok, hf_reference):
    import ftfy

    rng = random.Random(1234)
    compared = changed_by_ftfy = 0
    mismatches = []
    for _ in range(400):
        text = random_text(rng)
        # documented difference: open_clip html-unescapes even when ftfy does not ('<' present)
        if "&" in text or "<" in text:
            continue
        compared += 1
        changed_by_ftfy += ftfy.fix_text(text) != text
        ours, ref = tok.encode(text), hf_reference(text)
        if ours != ref:
            mismatches.append((text, ours, ref))
    assert compared >= 300
    assert changed_by_ftfy >= 20  # the ftfy step is really exercised
    assert not mismatches, mismatches[:3]


def test_hf_reference_agrees_on_fixture_cases(tok, hf_reference):
    for case in CASES:
        if case["hf_slow_CLIPTokenizer_agrees"]:
            assert hf_reference(case["text"]) == case["ids"] == tok.encode(case["text"])
        else:
            assert hf_reference(case["text"]) == case["hf_slow_ids"] != tok.encode(case["text"])


# --------------------------------------------------------------------------- added tokens


def test_added_tokens_are_single_ids():
    tok = Tokenizer()
    plain = tok.encode
    cat_toy, star = tok.add_token("<cat-toy>"), tok.add_token("S*")
    assert (cat_toy, star) == (49408, 49409)
    assert len(tok) == 49410
    assert tok.added_tokens == {"<cat-toy>": 49408, "S*": 49409}

    ids = tok.encode("A <cat-toy>, next to (S*)!")
    assert ids.count(cat_toy) == 1 and ids.count(star) == 1
    a, comma_next_to, paren = plain("A")[1:-1], plain(", next to (")[1:-1], plain(")!")[1:-1]
    assert ids == [START, *a, cat_toy, *comma_next_to, star, *paren, END]

    assert tok.encode("<cat-toy><cat-toy>S*S*") == [START, cat_toy, cat_toy, star, star, END]
    assert tok.encode("S*'s <cat-toy>.") == [START, star, *plain("'s")[1:-1], cat_toy, *plain(".")[1:-1], END]
    assert tok.num_tokens("a photo of <cat-toy>") == 4
    assert tok.word_id("<cat-toy>") == cat_toy and tok.word_id("S*") == star

    batch = tok(["a <cat-toy> toy on the beach", "S*"])
    assert batch.shape == (2, 77)
    assert batch[0, 2].item() == cat_toy and batch[1, :3].tolist() == [START, star, END]


def test_added_tokens_case_sensitive_and_longest_first():
    tok = Tokenizer()
    short, long_, spaced = tok.add_token("<cat>"), tok.add_token("<cat-toy>"), tok.add_token("<my token>")
    assert (short, long_, spaced) == (49408, 49409, 49410)
    assert tok.encode("<cat-toy> <cat> <my token>") == [START, long_, short, spaced, END]
    tok.add_token("S*")
    assert tok.encode("s*") == Tokenizer().encode("s*")  # lower case is not the placeholder
    assert tok.encode("s*") == [START, tok.encoder["s</w>"], tok.encoder["*</w>"], END]
    # text without placeholders is unaffected by their presence
    assert tok.encode("a photo of a sks dog") == CASES[0]["ids"]


def test_add_token_again_returns_same_id():
    tok = Tokenizer()
    first = tok.add_token("<cat-toy>")
    assert tok.add_token("<cat-toy>") == first
    assert len(tok) == 49409
    assert tok.add_token("<other>") == first + 1


@pytest.mark.parametrize("word", ["cat", "Cat", "object", "sks", "!", "<|endoftext|>"])
def test_add_existing_word_raises(word):
    tok = Tokenizer()
    with pytest.raises(ValueError, match="already a word in the vocabulary; choose a placeholder that is not"):
        tok.add_token(word)
    assert len(tok) == 49408 and tok.added_tokens == {}


def test_add_empty_token_raises():
    tok = Tokenizer()
    for bad in ["", "   "]:
        with pytest.raises(ValueError, match="empty"):
            tok.add_token(bad)
    with pytest.raises(TypeError):
        tok.add_token(42)
    assert len(tok) == 49408


def test_added_token_decodes():
    tok = Tokenizer()
    tok.add_token("<cat-toy>")
    assert tok.decode(tok.encode("a <cat-toy> toy on the beach")) == "a <cat-toy> toy on the beach"


# --------------------------------------------------------------------------- decode / helpers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a photograph of an astronaut riding a horse", "a photograph of an astronaut riding a horse"),
        ("  A HIGHLY   detailed\nportrait ", "a highly detailed portrait"),
        ("Hello, World!", "hello , world !"),
        ("café crème 東京 🐱", "café crème 東京 🐱"),
        ("supercalifragilisticexpialidocious", "supercalifragilisticexpialidocious"),
        ("", ""),
    ],
)
def test_decode_round_trip(tok, text, expected):
    assert tok.decode(tok.encode(text)) == expected
    assert tok.decode(tok(text)[0]) == expected  # tensor input, padding skipped


def test_decode_unknown_id_raises(tok):
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([START, 49408, END])


def test_word_id(tok):
    object_id = tok.word_id("object")
    assert isinstance(object_id, int) and tok.encode("object") == [START, object_id, END]
    assert tok.decoder[object_id] == "object</w>"
    assert tok.word_id("  Object ") == object_id
    assert tok.word_id("supercalifragilisticexpialidocious") is None
    assert tok.word_id("two words") is None
    assert tok.word_id("") is None


def test_bpe_cache_is_used():
    tok = Tokenizer()
    assert tok.encode("dogs") == [START, tok.encoder["dogs</w>"], END]
    assert tok.cache["dogs"] == "dogs</w>"
    tok.cache["dogs"] = "dog s</w>"  # poison the cache: encode must read from it
    assert tok.encode("dogs") == [START, tok.encoder["dog"], tok.encoder["s</w>"], END]
