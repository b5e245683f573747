"""Training data: text prepared into token ids, and the batches a run draws from them.

    python train_jax.py prepare --input FILE [FILE...] --out DIR [--tokenizer gpt2|bytes] [--shard_tokens N]

A data folder prepared here holds train.bin and val.bin (uint16 ids, nanoGPT's format) or shards of
them (train_000000.bin, ...), meta.json (totals, largest id), and the vocabulary (encoder.json +
vocab.bpe). Training also reads the shards of llm.c (.bin with a header) and build-nanogpt (.npy).
The batch of step s is a pure function of (seed, s); its windows are memory-mapped from the shards.
"""

import collections
import functools
import gzip
import json
import os
import re
import shutil
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from cli import UserError, check_folder, log, progress
from encoder import bytes_to_unicode, gpt2_vocab_dir, load_encoder, vocab_path
from sharding import process_rows
from formats import VOCAB_FILES, copy_vocab, read_json
from utils import download_file

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TOKENIZERS = ("gpt2", "bytes")
CHUNK_BYTES = 1 << 20  # prepare reads and encodes about this much text at a time
TRAIN_STREAM, EVAL_STREAM = 0, 1  # the random streams batches are drawn from, with the seed
CUT = re.compile(r"(?<=\S\n)(?=\S)")  # where text_chunks may cut: see there
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256  # llm.c's token shards


def input_kind(path):
    """How prepare reads a file: its documents are the lines of a .jsonl(.gz), the rows of a
    .parquet, or the whole of any other (text) file."""
    name = path.lower()
    return "jsonl" if name.endswith((".jsonl", ".jsonl.gz")) else "parquet" if name.endswith(".parquet") else "text"


def check_inputs(paths, tokenizer):
    if not paths:
        raise UserError("give at least one text file: prepare --input FILE [FILE...] --out DIR")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--input {path!r} is not a file: give the path of a text file")
        if tokenizer == "bytes" and input_kind(path) != "text":
            raise UserError(f"--input {path}: --tokenizer bytes reads text files only; use --tokenizer gpt2 for .jsonl and .parquet")
    if sum(os.path.getsize(path) for path in paths) == 0:
        raise UserError(f"--input {', '.join(paths)} is empty: give a file with some text")
    if any(input_kind(path) == "parquet" for path in paths):
        parquet_module()


def parquet_module():
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError('reading .parquet needs pyarrow: pip install -e ".[parquet]" (or pip install pyarrow)')
    return pyarrow.parquet


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


def text_chunks(path, chunk_bytes=None):
    """The file's text in pieces of about chunk_bytes (and their sizes in bytes), cut only between a
    line ending in a non-space and '\n' and a line starting with a non-space: GPT-2's pre-tokenizer
    never joins across such a cut, so encoding the pieces gives the ids of encoding the whole. The file
    is read in blocks of whole lines and searched with a regex (a loop over lines costs as much as
    the encoding)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    text, rest, line = "", b"", 1
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            lines = rest + block
            end = lines.rfind(b"\n") + 1 if block else len(lines)  # '\n' is never inside a UTF-8 character
            lines, rest = lines[:end], lines[end:]
            try:
                decoded = lines.decode("utf-8")
            except UnicodeDecodeError as e:
                number = line + lines[: e.start].count(b"\n")
                raise UserError(f"--input {path} line {number} is not UTF-8: re-save it as UTF-8, or use --tokenizer bytes")
            line += decoded.count("\n")
            searched, text = max(chunk_bytes, len(text) - 1), text + decoded
            while cut := CUT.search(text, searched):
                piece, text, searched = text[: cut.start()], text[cut.start() :], chunk_bytes
                yield piece, len(piece.encode())
            if not block:
                yield text, len(text.encode())
                return


def text_documents(path, text_field):
    """(text, starts a document, input bytes read) of a text file: one document in pieces."""
    for i, (text, size) in enumerate(text_chunks(path)):
        yield text, i == 0, size


def jsonl_documents(path, text_field):
    """(text, starts a document, input bytes read) of each line of a .jsonl or .jsonl.gz."""
    with open(path, "rb") as raw:
        lines = gzip.open(raw) if path.lower().endswith(".gz") else raw
        read = 0
        try:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)
                except ValueError:  # UnicodeDecodeError too
                    raise UserError(f"--input {path} line {number} is not JSON in UTF-8: fix or remove that line")
                text = document.get(text_field) if isinstance(document, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"--input {path} line {number} has no text field {text_field!r}: name the field with --text_field")
                yield text, True, raw.tell() - read
                read = raw.tell()
        except (OSError, EOFError) as e:  # gzip's bad or cut-short streams
            raise UserError(f"--input {path} is not a complete gzip file ({e}): download it again")


def parquet_documents(path, text_field):
    """(text, starts a document, input bytes read) of each row of a .parquet's text column."""
    import pyarrow

    try:
        file = parquet_module().ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"--input {path} is not a parquet file ({str(e)[:120]}): download it again")
    if text_field not in file.schema_arrow.names:
        raise UserError(f"--input {path} has no column {text_field!r} (it has {', '.join(file.schema_arrow.names)}): name it with --text_field")
    bytes_per_row, row = os.path.getsize(path) / max(1, file.metadata.num_rows), 0
    for batch in file.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise UserError(f"--input {path} row {row} has no text in {text_field!r}: remove that row")
            row += 1
            yield text, True, bytes_per_row


DOCUMENTS = {"text": text_documents, "jsonl": jsonl_documents, "parquet": parquet_documents}


def work_items(paths, text_field):
    """The inputs' documents grouped into lists of about CHUNK_BYTES of text: (pieces, input bytes),
    each piece (text, whether <|endoftext|> goes before it). Documents are separated by
    <|endoftext|>: a text file is one document, a jsonl line or a parquet row is one."""
    pieces, size, read, first = [], 0, 0, True
    for path in paths:
        for text, starts_document, n_read in DOCUMENTS[input_kind(path)](path, text_field):
            pieces.append((text, starts_document and not first))
            size, read, first = size + len(text), read + n_read, False
            if size >= CHUNK_BYTES:
                yield pieces, read
                pieces, size, read = [], 0, 0
    yield pieces, read


def encode_item(encode, eot, pieces):  # -> [n_ids] uint16
    arrays = [np.zeros(0, np.uint32)]  # the last item may be empty
    for text, after_eot in pieces:
        arrays += [np.array([eot], np.uint32)] if after_eot else []
        arrays.append(encode(text))
    return np.concatenate(arrays).astype(np.uint16)


def numpy_encoder(encoder):
    """text -> uint32 ids: tiktoken's encode_to_numpy without special tokens (encode_ordinary's ids,
    without a Python int per id), or the reference BPE for a vocabulary tiktoken cannot take."""
    if encoder.fast is None:
        return lambda text: np.array(encoder.encode_python(text), np.uint32)
    return lambda text: encoder.fast.encode_to_numpy(text, disallowed_special=())


@functools.lru_cache(maxsize=1)  # one per process: a worker builds its encoder once
def item_encoder(vocab_dir):
    encoder = load_encoder(vocab_dir)
    return functools.partial(encode_item, numpy_encoder(encoder), encoder.eot_token)


def encode_with(vocab_dir, pieces):  # -> [n_ids] uint16
    return item_encoder(vocab_dir)(pieces)


def gpt2_ids(paths, vocab_dir, text_field, num_proc, bar):
    """The inputs' GPT-2 BPE ids, in order, chunk by chunk, encoded in this process or by num_proc
    worker processes (threads share tiktoken's GIL-free encoder less well: 1.45x on 2 cores against
    1.76x for processes); at most 2 * num_proc chunks of text are in flight."""
    if num_proc == 1:
        for pieces, read in work_items(paths, text_field):
            yield encode_with(vocab_dir, pieces)
            bar.update(read)
        return
    spawn = multiprocessing.get_context("spawn")  # a fork would copy JAX's threads mid-flight
    with ProcessPoolExecutor(num_proc, mp_context=spawn) as pool:
        pending = collections.deque()
        for pieces, read in work_items(paths, text_field):
            pending.append((pool.submit(encode_with, vocab_dir, pieces), read))
            if len(pending) >= 2 * num_proc:
                ids, read = pending.popleft()
                yield ids.result()
                bar.update(read)
        for ids, read in pending:
            yield ids.result()
            bar.update(read)


def bpe_vocab(vocab_dir):
    """The folder --vocab_dir names for --tokenizer gpt2: GPT-2's shipped with the project (''), or one
    holding another encoder.json and vocab.bpe (or HF's vocab.json and merges.txt)."""
    if not vocab_dir:
        return gpt2_vocab_dir()
    missing = [name for name in VOCAB_FILES if not os.path.isfile(vocab_path(vocab_dir, name))]
    if missing:
        raise UserError(
            f"--vocab_dir {vocab_dir} has no {' or '.join(missing)}: give a folder holding both, or leave --vocab_dir out for GPT-2's"
        )
    return vocab_dir


def shard_name(split, index, shard_tokens):
    return f"{split}_{index:06d}.bin" if shard_tokens else f"{split}.bin"


def write_ids(chunks, folder, split, shard_tokens):
    """Write the chunks of ids as raw uint16 into folder/SPLIT.bin, or with shard_tokens into
    SPLIT_000000.bin, SPLIT_000001.bin, ... of shard_tokens ids each (the last one shorter).
    Returns (the paths written, the number of ids, the largest id)."""
    paths, n_ids, largest, room, f = [], 0, -1, 0, None
    try:
        for ids in chunks:
            largest, n_ids = max(largest, int(ids.max(initial=0))), n_ids + len(ids)
            while len(ids):
                if f is None or (shard_tokens and not room):  # the next file
                    if f is not None:
                        f.close()
                    paths.append(os.path.join(folder, shard_name(split, len(paths), shard_tokens)))
                    f, room = open(paths[-1], "wb"), shard_tokens
                take = room if shard_tokens else len(ids)
                ids[:take].tofile(f)
                ids, room = ids[take:], room - len(ids[:take])
    finally:
        if f is not None:
            f.close()
    return paths, n_ids, largest


def tail_chunks(paths, start):
    """The ids of the files (in order) from position `start` on, in chunks."""
    for path in paths:
        ids = np.memmap(path, np.uint16, "r")
        for begin in range(max(0, start), len(ids), CHUNK_BYTES):
            yield np.array(ids[begin : begin + CHUNK_BYTES])
        start -= len(ids)


def split_off_val(train_paths, n_train, folder, shard_tokens):
    """Move the ids after the first n_train of the train files into val file(s); the train files
    keep exactly the first n_train."""
    val_paths, _, _ = write_ids(tail_chunks(train_paths, n_train), folder, "val", shard_tokens)
    kept = n_train
    for path in train_paths:
        size = os.path.getsize(path) // 2
        if kept > 0 or path == train_paths[0]:
            os.truncate(path, max(0, min(size, kept)) * 2)
        else:
            os.remove(path)
        kept -= size
    return val_paths


def prepare(
    *more_inputs,
    input=None,
    out=None,
    tokenizer="gpt2",
    val_fraction=0.1,
    vocab_dir="",
    text_field="text",
    num_proc=0,
    shard_tokens=0,
):
    """Tokenize text files, .jsonl(.gz) or .parquet into OUT/train.bin, val.bin (uint16 ids), meta.json,
    encoder.json, vocab.bpe; with --shard_tokens, into train_000000.bin, ... and val_000000.bin, ...

    Args:
      more_inputs: more input files, after the first (`--input a.txt b.jsonl.gz c.parquet`).
      input: a text file (one document), .jsonl or .jsonl.gz (a JSON document per line) or .parquet
        (a document per row).
      out: the data folder to write (give it to training as --data_dir).
      tokenizer: gpt2 (GPT-2's BPE, <|endoftext|> between documents) or bytes (one id per byte that
        occurs; text files only).
      val_fraction: the share of ids, at the end, held out as val.
      vocab_dir: a folder with another BPE's encoder.json and vocab.bpe ('': GPT-2's, which ship with the
        project; gpt2 only).
      text_field: the JSON field or parquet column that holds a document's text.
      num_proc: processes encoding at once (0: all the machine's cores); the ids do not depend on it.
      shard_tokens: 0 for one train.bin and one val.bin, or the ids per file (e.g. 100_000_000: files of
        200 MB, as for FineWeb-edu).
    """
    paths = [str(p) for p in ([input] if input is not None else []) + list(more_inputs)]
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown --tokenizer {tokenizer!r}: use {' or '.join(TOKENIZERS)}")
    check_inputs(paths, tokenizer)
    if out is None:
        raise UserError("give the folder to write the data to: --out DIR")
    if type(val_fraction) not in (int, float) or not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be a number between 0 and 1 (e.g. 0.1), got {val_fraction!r}")
    if type(num_proc) is not int or num_proc < 0:
        raise UserError(f"--num_proc must be an integer >= 0 (0: all cores), got {num_proc!r}")
    if type(shard_tokens) is not int or shard_tokens < 0:
        raise UserError(f"--shard_tokens must be an integer >= 0 (0: one file per split), got {shard_tokens!r}")
    out, vocab_dir = check_folder(out, "out"), check_folder(vocab_dir, "vocab_dir")
    if tokenizer == "gpt2":
        vocab_dir = bpe_vocab(vocab_dir)
    partial = os.path.normpath(out) + ".partial"  # written whole, then moved into out: an error leaves nothing
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        meta = encode_inputs(paths, partial, tokenizer, val_fraction, vocab_dir, str(text_field), num_proc or os.cpu_count(), shard_tokens)
        os.makedirs(out, exist_ok=True)
        for path in split_paths(out, "train") + split_paths(out, "val"):
            os.remove(path)  # an earlier preparation's files would be read with the new ones
        for name in os.listdir(partial):
            os.replace(os.path.join(partial, name), os.path.join(out, name))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"{out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val ids, vocabulary of {meta['vocab_size']} ({tokenizer})")


def encode_inputs(paths, out, tokenizer, val_fraction, vocab_dir, text_field, num_proc, shard_tokens):
    """Write the data folder's files into `out`; returns its meta.json."""
    total = sum(os.path.getsize(path) for path in paths)
    bar = lambda desc: progress(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    if tokenizer == "bytes":
        with bar("bytes") as b:
            present = byte_vocabulary(paths, b)
        write_byte_vocab(present, out)
        vocab_size, chunks = len(present), lambda b: byte_ids(paths, present, b)
    else:
        copy_vocab(vocab_dir, out)
        vocab_size, chunks = len(load_encoder(out).encoder), lambda b: gpt2_ids(paths, out, text_field, num_proc, b)
    with bar(f"encoding ({tokenizer})") as b:
        train_paths, n_ids, largest = write_ids(chunks(b), out, "train", shard_tokens)
    n_train = int(n_ids * (1 - val_fraction))
    split_off_val(train_paths, n_train, out, shard_tokens)
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "train_tokens": n_train, "val_tokens": n_ids - n_train,
            "largest_id": largest, "shard_tokens": shard_tokens, "inputs": paths}  # fmt: skip
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


def read_meta(data_dir):
    """meta.json, or for a nanoGPT data folder without one, GPT-2's BPE (its default tokenizer)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        log(f"note: {data_dir} has no meta.json; assuming GPT-2 BPE ids (vocabulary of 50257)")
        return {"tokenizer": "gpt2", "vocab_size": 50257}
    return read_json(path, f"prepare --data_dir {data_dir} again (python train_jax.py prepare --input FILE --out {data_dir})")


def ensure_data(data_dir, data_url):
    """A data folder with a train split; when it has none, `data_url` is downloaded into it and
    prepared with the bytes tokenizer."""
    if split_paths(data_dir, "train"):
        return
    if not data_url:
        raise UserError(f"--data_dir {data_dir} has no train.bin: run `python train_jax.py prepare --input FILE --out {data_dir}`")
    text = os.path.join(data_dir, "input.txt")
    if not os.path.isfile(text):
        log(f"downloading {data_url} to {text}")
        os.makedirs(data_dir, exist_ok=True)
        offline = (f"put a text file at {text} (or prepare your data: python train_jax.py prepare --input FILE --out {data_dir}), "
                   f"or give --data_url a URL this machine reaches")  # fmt: skip
        download_file(data_url, text, offline)
    prepare(input=text, out=data_dir, tokenizer="bytes")


def split_paths(data_dir, split):
    """The split's files, in name order: SPLIT.bin (nanoGPT's, or one from prepare), SPLIT_000000.bin, ...
    (prepare's shards), *_SPLIT_000001.bin (llm.c's) and *_SPLIT_000001.npy (build-nanogpt's)."""
    pattern = re.compile(rf"(.*_)?{split}(_\d+)?\.(bin|npy)")
    names = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
    return [os.path.join(data_dir, name) for name in names if pattern.fullmatch(name)]


def truncated(path, size, why):
    return UserError(f"{path} is truncated ({size} bytes, {why}): prepare it again")


def open_npy(path, size):
    """build-nanogpt's shard: a 1-D uint16 .npy, memory-mapped."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, _, dtype = read_header(f)
        except (ValueError, KeyError) as e:
            raise UserError(f"{path} has a bad .npy header ({str(e)[:80]}): prepare it again")
        offset = f.tell()
    if dtype != np.uint16 or len(shape) != 1:
        raise UserError(f"{path} holds {dtype} of shape {shape}, not a row of uint16 ids: prepare it again")
    if size != offset + 2 * shape[0]:
        raise truncated(path, size, f"not the {offset + 2 * shape[0]} its header says")
    return np.memmap(path, np.uint16, "r", offset, shape)


def open_llmc(path, size):
    """llm.c's shard: 256 int32 (magic, version 1, the number of ids, zeros), then uint16 ids."""
    header = np.fromfile(path, "<i4", LLMC_HEADER_INTS)
    if len(header) < 3 or header[1] != LLMC_VERSION or header[2] < 0:
        raise UserError(f"{path} has llm.c's magic number but a bad header (version {header[1:2]}, not 1): prepare it again")
    expected = 4 * LLMC_HEADER_INTS + 2 * int(header[2])
    if size != expected:
        raise truncated(path, size, f"not the {expected} its header says")
    return np.memmap(path, np.uint16, "r", 4 * LLMC_HEADER_INTS, (int(header[2]),))


def open_shard(path):
    """A shard's ids, memory-mapped (nothing is read yet): a .npy, a .bin with llm.c's header, or a
    raw uint16 .bin (a raw file of GPT-2 ids cannot start with the magic: its first id would be 54216)."""
    size = os.path.getsize(path)
    if path.endswith(".npy"):
        return open_npy(path, size)
    if size >= 4 and np.fromfile(path, "<i4", 1)[0] == LLMC_MAGIC:
        return open_llmc(path, size)
    if size % 2:
        raise truncated(path, size, "not a whole number of uint16 ids")
    return np.memmap(path, np.uint16, "r") if size else np.zeros(0, np.uint16)


def load_split(data_dir, split, block_size, n_vocab):
    """The split's shards, memory-mapped (the ids are read only as batches need them): a dict of their
    paths, the arrays and the vocabulary batches are checked against. At start-up only the files'
    sizes and headers are read, and meta.json's largest id is checked."""
    paths = split_paths(data_dir, split)
    if not paths:
        raise UserError(
            f"{os.path.join(data_dir, split + '.bin')} is missing (no {split} split in {data_dir}): prepare the data again "
            f"(python train_jax.py prepare ...)"
        )
    shards = [open_shard(path) for path in paths]
    if sum(max(0, len(ids) - block_size) for ids in shards) == 0:
        n_ids = max(len(ids) for ids in shards)
        raise UserError(
            f"{paths[0] if len(paths) == 1 else data_dir + ' ' + split} has {n_ids} ids, too short for one block of "
            f"--block_size {block_size} (+1 target): lower --block_size or give more text"
        )
    meta = os.path.join(data_dir, "meta.json")
    largest = read_json(meta, "prepare the data again").get("largest_id", -1) if os.path.isfile(meta) else -1
    if largest >= n_vocab:
        raise outside_vocabulary(meta, largest, n_vocab)
    return {"paths": paths, "shards": shards, "n_vocab": n_vocab}


def outside_vocabulary(path, largest, n_vocab):
    return UserError(
        f"{path} holds id {largest}, outside the model's vocabulary of {n_vocab}: prepare the data with the "
        f"model's tokenizer or raise --vocab_size"
    )


def window_starts(split, block_size):
    """The index of each shard's first window among all the split's windows, and their total: a
    window is block_size + 1 consecutive ids of one shard."""
    counts = [max(0, len(ids) - block_size) for ids in split["shards"]]
    return np.cumsum([0, *counts[:-1]]), sum(counts)


def batch_offsets(seed, stream, index, shape, split, block_size):
    """Which windows one batch reads, as indices among all the split's windows (so each shard is drawn
    in proportion to its size): a pure function of (seed, stream, index). For a single file, the
    index of a window is where it starts."""
    _, n_windows = window_starts(split, block_size)
    return np.random.default_rng([seed, stream, index]).integers(0, n_windows, shape)


def get_batch(split, offsets, block_size):  # [...] -> inputs, targets [..., block_size]
    starts, _ = window_starts(split, block_size)
    shard = np.searchsorted(starts, offsets, side="right") - 1  # [...]
    local = offsets - starts[shard]  # [...] where in its shard each window starts
    block = np.empty((*offsets.shape, block_size + 1), np.int32)
    for i in np.unique(shard):
        rows = shard == i
        block[rows] = split["shards"][i][local[rows][:, None] + np.arange(block_size + 1)]
    if block.size and (largest := int(block.max())) >= split["n_vocab"]:
        raise outside_vocabulary(split["paths"][int(shard.flat[np.argmax(block.max(-1))])], largest, split["n_vocab"])
    return block[..., :-1], block[..., 1:]


def split_ids(split, start, stop):  # -> [stop - start] int32
    """The ids start:stop of the split's files taken as one sequence, in order."""
    pieces, offset = [], 0
    for ids in split["shards"]:
        low, high = max(start - offset, 0), min(stop - offset, len(ids))
        pieces += [ids[low:high]] if low < high else []
        offset += len(ids)
    return np.concatenate(pieces).astype(np.int32)


def sharded_batch(split, offsets, block_size, sharding):  # offsets [..., batch] -> inputs, targets [..., batch, block_size]
    """`get_batch` as global arrays split by `sharding`: this process reads only the rows its devices hold."""
    import jax

    shape = (*offsets.shape, block_size)
    rows = process_rows(sharding, shape, offsets.ndim - 1)
    local = get_batch(split, offsets[..., rows], block_size)
    return tuple(jax.make_array_from_process_local_data(sharding, x, shape) for x in local)
