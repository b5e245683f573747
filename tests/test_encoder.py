"""encoder.py against tiktoken's own GPT-2 construction (its loader, its split pattern), built from
OpenAI's real encoder.json and vocab.bpe."""

import hashlib
import os
import random

import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from encoder import Encoder, load_encoder

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

VARIED_TEXT = (
    "Hello, world! It's 2026 and we'll see; they're sure I'd've known. DON'T SHOUT.\n\n\n"
    "   leading spaces,\ttabs\t\tand trailing spaces   \n"
    "naïve café résumé — “quotes” ‘single’ … ¿Qué? Ελληνικά русский 中文字符 日本語 한국어 עברית العربية\n"
    "emoji 😀🎉👩‍👩‍👧‍👦 🇺🇸 flags, combining é (e\u0301), zero\u200bwidth, nbsp\u00a0here\r\n"
    "numbers 0 7 42 3.14159 1,000,000 1e-5 0x1F 2026-11-22 12:51\n"
    "code: def f(x): return x**2 + 1  # comment\n    if a != b and c <= d: pass\n"
    "<|endoftext|> as plain text <|endoftext|>, and odd bytes \x00\x01\x7f \ufffd end "
)


@pytest.fixture(scope="module")
def official(vocab_dir):
    """tiktoken's gpt2 encoding, made as tiktoken_ext.openai_public.gpt2() makes it, from local files."""
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # no cache: read the files themselves
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(vocab_dir, "vocab.bpe"),
        encoder_json_file=os.path.join(vocab_dir, "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


@pytest.fixture(scope="module")
def encoder(vocab_dir):
    return load_encoder(vocab_dir)


def random_texts(n, seed=0):
    """Strings mixing scripts, emoji, whitespace runs, digits and apostrophes."""
    pool = list("aZ ’'\n\t 09.,!?-_") + ["   ", "\n\n", "'s", "'ll", "😀", "👩‍💻", "中", "é", "e\u0301", "Ω", "\u00a0"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 60))) for _ in range(n)]


def test_fixture_files_are_openais(vocab_dir):
    for name, digest in [("vocab.bpe", VOCAB_BPE_SHA256), ("encoder.json", ENCODER_JSON_SHA256)]:
        with open(os.path.join(vocab_dir, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest


@pytest.mark.parametrize("text", [VARIED_TEXT, *random_texts(200)])
def test_both_paths_match_tiktoken_and_round_trip(encoder, official, text):
    expected = official.encode_ordinary(text)
    assert encoder.encode_python(text) == expected
    assert encoder.encode(text) == expected
    assert encoder.decode(expected) == text


def test_fast_path_is_tiktoken(encoder):
    assert isinstance(encoder.fast, tiktoken.Encoding)


def test_endoftext_in_text_is_text(encoder):
    ids = encoder.encode("<|endoftext|>")
    assert encoder.eot_token == 50256 and 50256 not in ids and len(ids) > 1


def test_decode_of_a_cut_character_gives_replacement(encoder):
    ids = encoder.encode("😀")
    assert len(ids) > 1
    assert "\ufffd" in encoder.decode(ids[:1])  # never raises
    assert encoder.decode(ids) == "😀"


def test_vocab_without_all_bytes_uses_python_path():
    """A byte-level vocabulary of only the bytes a corpus uses has no tiktoken path, and still works."""
    symbols = sorted(set("hello world"))
    byte_to_char = {ord(c): c for c in symbols if c != " "} | {ord(" "): "Ġ"}
    vocab = {byte_to_char[ord(c)]: i for i, c in enumerate(symbols)}
    encoder = Encoder(vocab, bpe_merges=[])
    assert encoder.fast is None
    ids = encoder.encode("hello world")
    assert ids == [vocab[byte_to_char[ord(c)]] for c in "hello world"]
    assert encoder.decode(ids) == "hello world"
