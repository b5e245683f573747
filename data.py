"""Training data: text prepared into token ids, and the batches a run draws from them.

    python train_jax.py prepare --input FILE [FILE...] --out DIR [--tokenizer gpt2|bytes]

A data folder holds train.bin and val.bin (uint16 ids, nanoGPT's format), meta.json, and the
vocabulary (encoder.json + vocab.bpe). The batch of step s is a pure function of (seed, s).
"""

import json
import os
import shutil

import numpy as np

from cli import UserError, check_folder, log
from encoder import bytes_to_unicode, load_encoder
from sharding import process_rows
from utils import VOCAB_FILES, base_url, download_file

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TOKENIZERS = ("gpt2", "bytes")
CHUNK_BYTES = 1 << 20  # prepare reads and encodes about this much text at a time
TRAIN_STREAM, EVAL_STREAM = 0, 1  # the random streams batches are drawn from, with the seed


def check_inputs(paths):
    if not paths:
        raise UserError("give at least one text file: prepare --input FILE [FILE...] --out DIR")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--input {path!r} is not a file: give the path of a text file")
    if sum(os.path.getsize(path) for path in paths) == 0:
        raise UserError(f"--input {', '.join(paths)} is empty: give a file with some text")


def check_utf8(paths):
    """Every line decodes as UTF-8 (one streaming pass), so that a bad byte stops prepare before it writes."""
    for path in paths:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"--input {path} line {number} is not UTF-8: re-save it as UTF-8, or use --tokenizer bytes")


def byte_vocabulary(paths, bar):
    """The sorted bytes that occur in the files (one streaming pass)."""
    counts = np.zeros(256, np.int64)
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                counts += np.bincount(np.frombuffer(chunk, np.uint8), minlength=256)
                bar.update(len(chunk))
    return np.flatnonzero(counts)


def write_byte_vocab(present, out):
    """encoder.json mapping each present byte (as GPT-2's printable character) to its rank, and a
    vocab.bpe without merges: encoder.py then encodes and decodes byte by byte."""
    byte_encoder = bytes_to_unicode()
    with open(os.path.join(out, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump({byte_encoder[int(b)]: i for i, b in enumerate(present)}, f, ensure_ascii=False)
    with open(os.path.join(out, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")


def byte_ids(paths, present, bar):
    """The files' bytes as ids, chunk by chunk."""
    table = np.zeros(256, np.uint16)
    table[present] = np.arange(len(present))
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield table[np.frombuffer(chunk, np.uint8)]
                bar.update(len(chunk))


def text_chunks(path, chunk_bytes=CHUNK_BYTES):
    """The file's text in pieces of about chunk_bytes (and its byte count), cut only between a line
    ending in 'x\\n' and a line starting with a non-space: GPT-2's pre-tokenizer never joins across
    such a cut, so encoding the pieces gives the ids of encoding the whole."""
    lines, size, previous = [], 0, ""
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8")  # check_utf8 has read it
            if size >= chunk_bytes and not line[:1].isspace() and previous[-2:-1] not in ("", *" \t\r\n\f\v"):
                yield "".join(lines), size
                lines, size = [], 0
            lines.append(line)
            size += len(raw)
            previous = line
    yield "".join(lines), size


def gpt2_ids(paths, encoder, bar):
    """The files' GPT-2 BPE ids with <|endoftext|> between files, chunk by chunk."""
    for i, path in enumerate(paths):
        if i:
            yield np.array([encoder.eot_token], np.uint16)
        for text, size in text_chunks(path):
            yield np.array(encoder.encode(text), np.uint16)
            bar.update(size)


def gpt2_vocab(vocab_dir):
    """The folder holding GPT-2's encoder.json and vocab.bpe, fetching just those two when missing."""
    os.makedirs(vocab_dir, exist_ok=True)
    for name in VOCAB_FILES:
        if not os.path.isfile(os.path.join(vocab_dir, name)):
            download_file(f"{base_url()}/124M/{name}", os.path.join(vocab_dir, name))
    return vocab_dir


def move_tail(train_path, val_path, n_train):
    """Move the ids after the first n_train of train.bin into val.bin, in chunks."""
    ids = np.memmap(train_path, np.uint16, "r")
    with open(val_path, "wb") as f:
        for start in range(n_train, len(ids), CHUNK_BYTES):
            ids[start : start + CHUNK_BYTES].tofile(f)
    del ids
    os.truncate(train_path, n_train * 2)


def prepare(*more_inputs, input=None, out=None, tokenizer="gpt2", val_fraction=0.1, vocab_dir="models/124M"):
    """Tokenize text files into OUT/train.bin, val.bin (uint16 ids), meta.json, encoder.json, vocab.bpe.

    Args:
      more_inputs: more text files, after the first (`--input a.txt b.txt`).
      input: a text file.
      out: the data folder to write (give it to training as --data_dir).
      tokenizer: gpt2 (GPT-2's BPE, <|endoftext|> between files) or bytes (one id per byte that occurs).
      val_fraction: the share of ids, at the end, held out as val.bin.
      vocab_dir: where GPT-2's encoder.json and vocab.bpe are (fetched there when missing; gpt2 only).
    """
    paths = [str(p) for p in ([input] if input is not None else []) + list(more_inputs)]
    check_inputs(paths)
    if out is None:
        raise UserError("give the folder to write the data to: --out DIR")
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown --tokenizer {tokenizer!r}: use {' or '.join(TOKENIZERS)}")
    if type(val_fraction) not in (int, float) or not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be a number between 0 and 1 (e.g. 0.1), got {val_fraction!r}")
    from tqdm import tqdm

    out, vocab_dir = check_folder(out, "out"), check_folder(vocab_dir, "vocab_dir")
    if tokenizer == "gpt2":
        check_utf8(paths)
        gpt2_vocab(vocab_dir)
    os.makedirs(out, exist_ok=True)
    total = sum(os.path.getsize(path) for path in paths)
    bar = lambda desc: tqdm(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    if tokenizer == "bytes":
        with bar("bytes") as b:
            present = byte_vocabulary(paths, b)
        write_byte_vocab(present, out)
        vocab_size, chunks = len(present), lambda b: byte_ids(paths, present, b)
    else:
        for name in VOCAB_FILES:
            shutil.copyfile(os.path.join(vocab_dir, name), os.path.join(out, name))
        encoder = load_encoder(out)
        vocab_size, chunks = len(encoder.encoder), lambda b: gpt2_ids(paths, encoder, b)
    train_path, val_path = os.path.join(out, "train.bin"), os.path.join(out, "val.bin")
    n_tokens = 0
    with open(train_path, "wb") as f, bar(f"encoding ({tokenizer})") as b:
        for ids in chunks(b):
            ids.tofile(f)
            n_tokens += len(ids)
    n_train = int(n_tokens * (1 - val_fraction))
    move_tail(train_path, val_path, n_train)
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "train_tokens": n_train, "val_tokens": n_tokens - n_train}
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "inputs": paths}, f, indent=2)
    log(f"{out}: {n_train:,} train and {n_tokens - n_train:,} val ids, vocabulary of {vocab_size} ({tokenizer})")


def read_meta(data_dir):
    """meta.json, or for a nanoGPT data folder without one, GPT-2's BPE (its default tokenizer)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        log(f"note: {data_dir} has no meta.json; assuming GPT-2 BPE ids (vocabulary of 50257)")
        return {"tokenizer": "gpt2", "vocab_size": 50257}
    return read_json(path, f"prepare --data_dir {data_dir} again (python train_jax.py prepare --input FILE --out {data_dir})")


def read_json(path, fix):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}): {fix}")


def ensure_data(data_dir, data_url):
    """A data folder with train.bin; when it has none, `data_url` is downloaded into it and
    prepared with the bytes tokenizer."""
    if os.path.isfile(os.path.join(data_dir, "train.bin")):
        return
    if not data_url:
        raise UserError(f"--data_dir {data_dir} has no train.bin: run `python train_jax.py prepare --input FILE --out {data_dir}`")
    text = os.path.join(data_dir, "input.txt")
    if not os.path.isfile(text):
        log(f"downloading {data_url} to {text}")
        os.makedirs(data_dir, exist_ok=True)
        download_file(data_url, text)
    prepare(input=text, out=data_dir, tokenizer="bytes")


def load_split(data_dir, split, block_size, n_vocab):
    """The ids of train.bin or val.bin, memory-mapped, checked to hold a block and fit the vocabulary."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: prepare the data again (python train_jax.py prepare ...)")
    if (size := os.path.getsize(path)) % np.dtype(np.uint16).itemsize:
        raise UserError(f"{path} is truncated ({size} bytes, not a whole number of uint16 ids): prepare it again")
    ids = np.memmap(path, np.uint16, "r")
    if len(ids) < block_size + 1:
        raise UserError(
            f"{path} has {len(ids)} ids, too short for one block of --block_size {block_size} (+1 target): "
            f"lower --block_size or give more text"
        )
    if (largest := int(ids.max())) >= n_vocab:
        raise UserError(
            f"{path} holds id {largest}, outside the model's vocabulary of {n_vocab}: prepare the data with the "
            f"model's tokenizer or raise --vocab_size"
        )
    return ids


def batch_offsets(seed, stream, index, shape, n_ids, block_size):
    """Where the blocks of one batch start: a pure function of (seed, stream, index)."""
    return np.random.default_rng([seed, stream, index]).integers(0, n_ids - block_size, shape)


def get_batch(ids, offsets, block_size):  # [...] -> inputs, targets [..., block_size]
    window = offsets[..., None] + np.arange(block_size + 1)  # [..., block_size + 1]
    block = ids[window].astype(np.int32)
    return block[..., :-1], block[..., 1:]


def sharded_batch(ids, offsets, block_size, sharding):  # offsets [..., batch] -> inputs, targets [..., batch, block_size]
    """`get_batch` as global arrays split by `sharding`: this process reads only the rows its devices hold."""
    import jax

    shape = (*offsets.shape, block_size)
    rows = process_rows(sharding, shape, offsets.ndim - 1)
    local = get_batch(ids, offsets[..., rows], block_size)
    return tuple(jax.make_array_from_process_local_data(sharding, x, shape) for x in local)
