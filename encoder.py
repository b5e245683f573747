"""GPT-2's byte-level BPE, written from the paper's description, with tiktoken as the fast path.

Both paths read the same two release files: `encoder.json` (token string -> id) and `vocab.bpe`
(merges, highest priority first). The pure-Python path is the readable reference; tiktoken, built
from the same local files (no network), does the same splits and merges about 10x faster. GPT-2's
own two files ship with the project (gpt2_vocab/), checked against their sha256 when read.
"""

import functools
import hashlib
import json
import os

from cli import UserError

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, each with an optional
# leading space; runs of whitespace keep their last space for the next word.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
# Hugging Face names OpenAI's two vocabulary files vocab.json and merges.txt; the contents are the same.
HF_VOCAB_NAMES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
# GPT-2's vocabulary, OpenAI's files byte for byte (the sha256 tiktoken checks them against), shipped
# beside this module (and in its wheel), so that nothing fetches them.
GPT2_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_vocab")
GPT2_VOCAB_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
REINSTALL = "reinstall the project (pip install -e . in its folder) or restore gpt2_vocab/ from git"


@functools.lru_cache
def bytes_to_unicode():
    """Map every byte 0..255 to a printable unicode character, so merges never see whitespace or
    control bytes. Printable latin-1 bytes map to themselves; the rest to 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + n for n in range(len(others))])))


def tiktoken_encoding(encoder):
    """A tiktoken Encoding with the same ids as `encoder` (token string -> id), or None when the
    vocabulary lacks a single byte (tiktoken needs all 256 to encode any text).

    GPT-2 assigns merged tokens ids in merge order, so an id doubles as the merge rank."""
    import tiktoken

    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(byte_decoder[c] for c in token): i for token, i in encoder.items() if token != EOT}
    if sum(len(token) == 1 for token in ranks) < 256:
        return None
    special = {EOT: encoder[EOT]} if EOT in encoder else {}
    return tiktoken.Encoding("gpt2-local", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


class Encoder:
    """encode: str -> list of ids, decode: ids -> str. `<|endoftext|>` inside text is plain text;
    the id of the real end-of-text token is `eot_token`."""

    def __init__(self, encoder, bpe_merges, fast=True):
        import regex  # here, not at the top: training on token ids (bench/gpu.py) never loads it

        self.encoder = encoder  # token string -> id
        self.decoder = {i: token for token, i in encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(bpe_merges)}
        self.eot_token = encoder.get(EOT)
        self.split = regex.compile(SPLIT_PATTERN)
        self.fast = tiktoken_encoding(encoder) if fast else None
        self.bpe = functools.lru_cache(maxsize=2**16)(self.merge)  # per encoder: dies with it

    def merge(self, word):
        """Merge the symbols of one pre-token, lowest merge rank first, until no pair merges."""
        symbols = list(word)
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode_python(self, text):
        """The reference BPE: split, map bytes to unicode, merge, look up ids."""
        ids = []
        for word in self.split.findall(text):
            unicode_word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(unicode_word))
        return ids

    def encode(self, text):
        return self.fast.encode_ordinary(text) if self.fast else self.encode_python(text)

    def decode_bytes(self, ids):
        return bytes(self.byte_decoder[c] for i in ids for c in self.decoder[int(i)])

    def decode(self, ids):
        """A cut multi-byte character decodes to U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def vocab_path(model_dir, name):
    """model_dir/name (encoder.json or vocab.bpe), or the same file under HF's name if only that is there."""
    path, hf_path = os.path.join(model_dir, name), os.path.join(model_dir, HF_VOCAB_NAMES[name])
    return hf_path if not os.path.isfile(path) and os.path.isfile(hf_path) else path


def load_encoder(model_dir, fast=True):
    """The Encoder of a model folder holding `encoder.json` and `vocab.bpe` (or HF's `vocab.json` and `merges.txt`)."""
    with open(vocab_path(model_dir, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
        raise ValueError("encoder.json must map token strings to integer ids")
    with open(vocab_path(model_dir, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    bpe_merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0 is a version header (#version: 0.2)
    if bad := next((n for n, merge in enumerate(bpe_merges, 2) if len(merge) != 2), None):
        raise ValueError(f"vocab.bpe line {bad} is not a pair of symbols")
    return Encoder(encoder, bpe_merges, fast=fast)


def get_encoder(model_size, models_dir):
    return load_encoder(os.path.join(models_dir, model_size))


def gpt2_vocab_dir():
    """The folder of GPT-2's encoder.json and vocab.bpe as they ship with the project, checked first."""
    for name, sha256 in GPT2_VOCAB_SHA256.items():
        path = os.path.join(GPT2_VOCAB_DIR, name)
        try:
            with open(path, "rb") as f:
                found = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            raise UserError(f"GPT-2's vocabulary file {path} cannot be read ({e.strerror or e}): {REINSTALL}")
        if found != sha256:
            raise UserError(f"{path} is not GPT-2's (sha256 {found[:16]}..., not {sha256[:16]}...): {REINSTALL}")
    return GPT2_VOCAB_DIR
