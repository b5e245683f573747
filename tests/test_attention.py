"""fused.py: the fused attention kernels against gpt2.attention's math (the loss and gradients of training,
the logits of generation), and what --attention runs on which device.

On a CPU, jax.nn.dot_product_attention's XLA implementation runs as it is and Pallas splash attention
(a TPU kernel) in interpret mode; cuDNN's needs an NVIDIA GPU, so here its choice is checked and its
programs traced, not run.
Sharded runs of the fused kernels are in test_sharding.py ("loss grads").
"""

import functools
import re
import types

import numpy as np
import pytest
from conftest import FLOAT32_EPS, float32_tolerance, forward_length, one_line_error
from test_train import data_dir, tiny_flags  # noqa: F401 (data_dir: a fixture)

import formats
import fused
import gpt2
import train_jax
from cli import UserError
from formats import flatten
from sharding import device_mesh
from step import init_params, init_state, loss_fn, make_optimizer, step_args, train_step
from train_jax import check_flags
from utils import load_encoder_hparams_and_params

HPARAMS = {"n_vocab": 64, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 1}  # splash's tiles need 128 positions
BATCH = (1, 2, 128)  # [grad_accum, batch, n_seq]


@pytest.fixture(scope="module")
def sgd_steps():
    """One train_step with each attention (compiled on first use) of plain SGD with learning rate 1:
    its loss, and the params it makes, `params - gradient`."""
    import jax
    import optax

    params = init_params(HPARAMS, seed=0)
    inputs, targets = np.random.default_rng(0).integers(0, HPARAMS["n_vocab"], (2, *BATCH), dtype=np.int32)
    kernels = {"math": gpt2.attention, "xla": fused.attention_kernel("xla"), "splash": fused.attention_kernel("splash", interpret=True)}

    @functools.cache
    def step(name):
        args = dict(optimizer=optax.sgd(1.0), n_head=HPARAMS["n_head"], rate=0.0, dtype="float32", attention=kernels[name])
        state, metrics = jax.jit(functools.partial(train_step, **args))(init_state(params, optax.sgd(1.0), 0), inputs, targets)
        return float(metrics["loss"]), {path: np.asarray(p) for path, p in flatten(formats.unstacked(state["params"])).items()}

    return step, flatten(params)


@pytest.mark.parametrize("name", ["xla", "splash"])
def test_fused_kernels_give_the_loss_and_gradients_of_the_math(sgd_steps, name):
    """Both sum the same products in another order (splash a tile of keys at a time, with a running
    max): float32 rounding over the forward's sums and the mean over the batch's tokens, relative to
    the loss, and to each gradient's largest entry (plus the new params' own rounding)."""
    step, before = sgd_steps
    (loss, params), (expected_loss, expected) = step(name), step("math")
    length = forward_length(HPARAMS, BATCH[2]) + BATCH[1] * BATCH[2]
    assert loss == pytest.approx(expected_loss, rel=float32_tolerance(1.0, length))
    for path, p in expected.items():
        gradient = before[path] - p
        stored = FLOAT32_EPS * np.abs(before[path]).max()  # each new param rounded to float32 (half an ulp, twice)
        np.testing.assert_allclose(before[path] - params[path], gradient, rtol=0, atol=float32_tolerance(np.abs(gradient).max(), length) + stored, err_msg=path)


def test_a_runs_attention_flag_reaches_its_train_step(data_dir):  # noqa: F811 (a fixture)
    """step_args (which train_jax, compile and bench/gpu.py build the step from) carries the kernel
    --attention names: the functions the test above compares."""
    flags = check_flags(tiny_flags(data_dir, "out", attention="xla"))
    hparams = {"n_vocab": 64, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    optimizer, _ = make_optimizer(1e-3, 1e-4, 0, 10, 0.1, 0.9, 0.95, 1.0)
    assert step_args(flags, hparams, optimizer, device_mesh(""))["attention"] is fused.KERNELS["xla"]
    assert step_args({**flags, "attention": "auto"}, hparams, optimizer, device_mesh(""))["attention"] is gpt2.attention  # on a CPU


def test_generation_through_the_xla_kernel_gives_the_math_logits(tf_model):
    """A ragged batch (left padding, so the prefill's mask is not causal) and two decode steps: the
    kernel takes generation's masks, which move with each token."""
    import jax

    encoder, hparams, params = load_encoder_hparams_and_params(tf_model[0])
    params = gpt2.to_backend(params, "jax")
    prompts = [encoder.encode("Alan Turing theorized that computers"), encoder.encode("Hi")]
    n_slots = max(map(len, prompts))
    pad = np.array([n_slots - len(p) for p in prompts], np.int32)
    inputs = np.array([[0] * n + p for n, p in zip(pad, prompts)], np.int32)
    logits = {}
    for name in ("math", "xla"):
        prefill, step = gpt2.jax_programs(hparams["n_head"], n_slots + 3, len(prompts), 0.0, 0, 1.0, name)
        out, cache = prefill(params, inputs, pad)
        logits[name] = [np.asarray(out)]
        key = jax.random.key(0)
        for slot in (n_slots, n_slots + 1):
            _, out, cache, key = step(params, out, cache, slot, pad, key)
            logits[name].append(np.asarray(out))
    for math_logits, fused_logits in zip(logits["math"], logits["xla"]):
        tolerance = float32_tolerance(np.abs(math_logits).max(), forward_length(hparams, n_slots + 3))
        np.testing.assert_allclose(fused_logits, math_logits, rtol=0, atol=tolerance)


def test_the_cudnn_kernel_traces_for_training_and_for_batched_generation(monkeypatch):
    """cuDNN's kernel needs an NVIDIA GPU to compile and run, but JAX's rules for it (its shapes, its
    gradient, its vmap over a batch of sequences) run while tracing: with cuDNN's version and the GPU's
    compute capability answered as on an H100, every program that --attention cudnn makes traces. (A
    mask of one head, [1, 1, n_q, n_k], failed its vmap, which takes every head's.)"""
    import jax
    import jax.numpy as jnp
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 90800)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    hparams = {"n_vocab": 64, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 1}
    params = init_params(hparams, seed=0)
    tokens = np.zeros((2, 32), np.int32)
    for remat in ("none", "block"):
        loss = functools.partial(loss_fn, key=None, n_head=4, rate=0.0, dtype="bfloat16", remat=remat, attention=fused.attention_kernel("cudnn"))
        traced = str(jax.make_jaxpr(jax.value_and_grad(loss))(formats.stacked(params), tokens, tokens))
        assert "dot_product_attention_fwd" in traced and "dot_product_attention_bwd" in traced  # cuDNN's primitives
    on_device = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    for batch in (1, 3):
        prefill, step = gpt2.jax_programs(4, 16, batch, 0.0, 0, 1.0, "cudnn")
        inputs, pad = np.zeros((batch, 10), np.int32), np.arange(batch, dtype=np.int32)
        assert "dot_product_attention_fwd" in str(jax.make_jaxpr(prefill)(on_device, inputs, pad))
        logits, cache = jax.eval_shape(prefill, on_device, inputs, pad)
        assert "dot_product_attention_fwd" in str(step.trace(on_device, logits, cache, 10, pad, jax.random.key(0)).jaxpr)


def device(platform, kind, cuda=None, capability=None):
    """A stand-in for a jax Device: what resolve_attention reads of one."""
    client = types.SimpleNamespace(platform_version=f"PJRT C API\ncuda {cuda}" if cuda else "PJRT C API\nrocm 60300")
    return types.SimpleNamespace(platform=platform, device_kind=kind, client=client, compute_capability=capability)


CPU = device("cpu", "cpu")
H100 = device("gpu", "NVIDIA H100 80GB HBM3", cuda=12080, capability="9.0")
A100 = device("gpu", "NVIDIA A100-SXM4-40GB", cuda=12080, capability="8.0")
T4 = device("gpu", "Tesla T4", cuda=12080, capability="7.5")
MI300 = device("gpu", "AMD Instinct MI300X")
V5E = device("tpu", "TPU v5 lite")


@pytest.mark.parametrize(
    "choice, on, dtype, dropout, head_dim, n_seq, expected",
    [
        ("auto", CPU, "float32", 0.0, 64, 1024, "math"),
        ("auto", CPU, "bfloat16", 0.0, 64, 1024, "math"),
        ("auto", H100, "bfloat16", 0.0, 64, 1024, "cudnn"),
        ("auto", H100, "bfloat16", 0.0, 64, None, "cudnn"),  # generation
        ("auto", H100, "float32", 0.0, 64, 1024, "math"),
        ("auto", H100, "bfloat16", 0.1, 64, 1024, "math"),
        ("auto", H100, "bfloat16", 0.0, 192, 1024, "cudnn"),
        ("auto", A100, "bfloat16", 0.0, 192, 1024, "math"),  # heads over 128 need Hopper
        ("auto", T4, "bfloat16", 0.0, 64, 1024, "math"),
        ("auto", MI300, "bfloat16", 0.0, 64, 1024, "math"),
        ("auto", V5E, "bfloat16", 0.0, 64, 1024, "splash"),
        ("auto", V5E, "float32", 0.0, 64, 1024, "splash"),
        ("auto", V5E, "bfloat16", 0.0, 64, 1000, "math"),
        ("auto", V5E, "bfloat16", 0.0, 64, None, "math"),
        ("auto", V5E, "bfloat16", 0.1, 64, 1024, "math"),
        ("math", H100, "bfloat16", 0.1, 64, 1024, "math"),
        ("xla", CPU, "float32", 0.0, 64, 16, "xla"),
        ("cudnn", H100, "bfloat16", 0.0, 64, 1024, "cudnn"),
        ("splash", V5E, "bfloat16", 0.0, 64, 128, "splash"),
        ("cudnn", CPU, "bfloat16", 0.0, 64, 1024, "cuDNN's flash attention needs an NVIDIA GPU, and this is 'cpu' (cpu)"),
        ("cudnn", MI300, "bfloat16", 0.0, 64, 1024, "needs an NVIDIA GPU, and this is 'AMD Instinct MI300X' (gpu)"),
        ("cudnn", T4, "bfloat16", 0.0, 64, 1024, "needs an Ampere GPU or newer (compute capability 8.0), and the Tesla T4 is 7.5"),
        ("cudnn", H100, "float32", 0.0, 64, 1024, "takes 16-bit inputs: give --dtype bfloat16, not float32"),
        ("cudnn", A100, "bfloat16", 0.0, 60, 1024, "heads of a multiple of 8 up to 128 wide on the NVIDIA A100-SXM4-40GB, and n_embd / n_head is 60"),
        ("xla", H100, "bfloat16", 0.1, 64, 1024, "it has no dropout: give --dropout 0, or --attention math"),
        ("splash", H100, "bfloat16", 0.0, 64, 1024, "splash attention is a TPU kernel, and this is 'NVIDIA H100 80GB HBM3' (gpu)"),
        ("splash", V5E, "bfloat16", 0.0, 64, 1000, "give a --block_size that is one, not 1000"),
        ("splash", V5E, "bfloat16", 0.0, 64, None, "generation's moves with each token"),
        ("flash", CPU, "float32", 0.0, 64, 1024, "unknown --attention 'flash': use auto, math, xla, cudnn, splash"),
    ],
)
def test_auto_picks_the_kernel_that_runs_and_a_choice_that_cannot_says_why(choice, on, dtype, dropout, head_dim, n_seq, expected):
    if expected in fused.ATTENTION:
        assert fused.resolve_attention(choice, on, dtype, dropout, head_dim, n_seq) == expected
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            fused.resolve_attention(choice, on, dtype, dropout, head_dim, n_seq)


def test_an_attention_that_cannot_run_stops_training_in_one_line_before_the_data_loads(data_dir, tmp_path):  # noqa: F811 (a fixture)
    with pytest.raises(UserError, match=r"^--attention cudnn cannot run here: cuDNN's flash attention needs an NVIDIA GPU"):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "out", max_iters=1, attention="cudnn", dtype="bfloat16"))
    with pytest.raises(UserError, match="unknown --attention 'einsum'"):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "out", max_iters=1, attention="einsum"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attention", "splash"], "--attention splash cannot run here: splash attention is a TPU kernel"),
        (["--attention", "xla", "--backend", "numpy"], "--attention xla needs --backend jax"),
        (["--attention", "flash"], "unknown --attention 'flash'"),
    ],
)
def test_generation_attention_errors_are_one_line(tf_model, capsys, flags, message):

    assert one_line_error(capsys, ["Hi", "--model_size", tf_model[0], "--n_tokens_to_generate", "2", *flags]).startswith(f"error: {message}")


GUARDED = """
import runpy, sys
for name in ("tensorflow", "orbax", "tiktoken", "regex", "requests", "huggingface_hub"):
    sys.modules[name] = None  # importing any of them now fails: what a bare GPU host lacks
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""
SPEED_ROW = r"{}\s+(\d+\.\d) +([\d,]+) +(\d+\.\d)% +(\S+) +(\d+\.\d+)"


@pytest.mark.slow  # about 30 s, a minute with nanoGPT
def test_the_gpu_race_runs_its_tiny_cpu_configuration_without_heavy_packages():
    """bench/gpu.py --device cpu imports none of what a GPU host may lack; on a machine without a GPU,
    the race itself is one line. nanoGPT's side runs with NANOGPT_DIR (a checkout) and torch here."""
    import importlib.util
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT

    run = lambda *args: subprocess.run([sys.executable, "-c", GUARDED, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    nanogpt = os.environ.get("NANOGPT_DIR", "") if importlib.util.find_spec("torch") else ""
    tiny = ["--device", "cpu", "--batch_size", "4", "--steps", "3", "--warmup", "1", "--optimizers", "adamw", "--attention", "xla"]
    done = run(*tiny, *(["--nanogpt", nanogpt] if nanogpt else []))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = re.search(SPEED_ROW.format(r"ours \(adamw, attention xla, remat none\)"), done.stdout)
    assert ours, done.stdout
    wall = float(re.search(r"wall time: (\d+) s", done.stdout)[1])
    assert 0 < float(ours[1]) * 3 / 1e3 <= wall + 1  # three timed steps within the run's wall time
    assert float(ours[5]) == pytest.approx(np.log(50304), rel=0.05)  # random ids: the loss stays near log(vocab)
    if nanogpt:
        reference = re.search(SPEED_ROW.format(r"nanoGPT \(eager, AdamW\)"), done.stdout)
        assert reference and float(reference[5]) == pytest.approx(np.log(50304), rel=0.05), done.stdout
        assert float(ours[4].rstrip("x")) == pytest.approx(float(ours[2].replace(",", "")) / float(reference[2].replace(",", "")), rel=0.01)
    else:
        assert "nanoGPT: not run" in done.stdout
    no_gpu = run()
    assert no_gpu.returncode == 2 and "Traceback" not in no_gpu.stderr
    assert no_gpu.stderr.strip().splitlines()[-1] == "error: no GPU here (JAX sees only cpu devices): run this on a GPU host, or give --device cpu for a tiny check"
