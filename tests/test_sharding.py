"""sharding.py, and train_jax.py and gpt2.py under --mesh, on CPU devices faked by XLA_FLAGS.

A process's device count is fixed when JAX starts, so every check runs in a subprocess
(multi_device.py) with 8 devices, or two processes with 4 each joined by jax.distributed; this
process keeps its one device. Each sharded result is compared with the same computation unsharded.

The checks that only read a result (a loss, bytes, specs) run as cases of ONE such process, started
in the background at the first test that needs one (`shared`): one JAX start-up, the programs two
checks share compiled once, and the tests that run scripts go on meanwhile.
"""

import importlib.util
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading

import pytest
from conftest import NEWTON_SCHULZ_GROWTH, PROMPT, ROOT, float32_tolerance, forward_length, prepared_text

TESTS = os.path.join(ROOT, "tests")
MESHES = ("dp=8", "fsdp=8", "dp=2,tp=4", "dp=2,fsdp=2,tp=2")
CORPUS = "".join(f"ROMEO: line {i} of the play, {i * 7 % 13} times.\nJULIET: and {i % 5}!\n\n" for i in range(200))
TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, batch_size=1, data_url="", peak_flops=1e9)  # 8 sequences on dp=8
TP8_ERROR = "--mesh tp=8 does not divide n_head=4 (tp splits the heads and the widths n_embd, 3*n_embd, 4*n_embd): use tp in 1, 2, 4"
SCHEDULE = dict(warmup_iters=0, lr_decay_iters=10, learning_rate=1e-2, eval_iters=2, log_interval=1)
# A mesh splits the sums of a step's loss (the forward, then the mean over 8 x 16 tokens, twice
# that for multi_device's [2, 8, 16] batch) in other places: the loss of one step may differ from
# the unsharded one by float32 rounding over those lengths, relative to the loss; over several steps,
# each step's rounding adds up.
LOSS_TOLERANCE = float32_tolerance(1.0, forward_length({"n_layer": 2, "n_embd": 32}, 16) + 2 * 8 * 16)



def device_env(n_devices):
    """The subprocesses' environment: `n_devices` CPU devices (and conftest's XLA flags), every program
    kept in the session's compilation cache (conftest) however fast it compiled, for the next process
    that compiles it."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}"
    return {**os.environ, "XLA_FLAGS": flags.strip(), "PYTHONPATH": ROOT, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def start(function, n_devices=8, **kwargs):
    """multi_device.FUNCTION(**kwargs) in a new process with `n_devices` CPU devices."""
    command = [sys.executable, "multi_device.py", function, json.dumps(kwargs)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.Popen(command, cwd=TESTS, env=device_env(n_devices), **pipes)


def result(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.splitlines()[-1])


def on_devices(function, n_devices=8, **kwargs):
    return result(start(function, n_devices, **kwargs))


def run_script(*args):
    """`python ARGS` in the repository with 8 CPU devices."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=device_env(8), capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_text(tmp_path_factory, CORPUS)


def run_flags(data_dir, out_dir, **overrides):
    return {"data_dir": data_dir, "out_dir": str(out_dir), **TINY, **SCHEDULE, **overrides}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The cases of the shared process: name -> (multi_device's function, its kwargs from the data
# folder and a folder for the runs), in the order the process runs them.

GOOD_SPECS = ["dp=8", "fsdp=-1,tp=2", "dp=2,fsdp=2,tp=2", "tp=2,dp=-1", ""]
BAD_SPECS = ["pp=2", "dp=3", "dp=-1,tp=3", "dp=-1,tp=-1", "dp=two", "dp=0,tp=8"]
# One device with 8 sequences, dp=8 and fsdp=8 with 1 each, dp=2,fsdp=2,tp=2 with 2 each: one global batch.
SAME_BATCH = [("", 8), ("dp=8", 1), ("fsdp=8", 1), ("dp=2,fsdp=2,tp=2", 2)]
THREE_STEPS = dict(max_iters=3, ckpt_interval=3, eval_interval=3)
VARIANTS = [dict(remat=remat, loss_chunk=chunk) for remat in ("none", "dots", "block") for chunk in (0, 4)] + [
    dict(remat="none", loss_chunk=0, attention="xla"), dict(remat="dots", loss_chunk=4, attention="xla")  # run per shard on a mesh
]
FIT_CHECK = lambda data_dir: run_flags(data_dir, "out", mesh="dp=8", n_layer=1)


def same_batch_runs(data_dir, out):
    return [run_flags(data_dir, out / f"batch {mesh}", mesh=mesh, batch_size=batch_size, **THREE_STEPS) for mesh, batch_size in SAME_BATCH]


CASES = {
    "mesh specs": lambda data_dir, out: ("mesh_specs", dict(specs=GOOD_SPECS + BAD_SPECS)),
    "batch plans": lambda data_dir, out: (
        "batch_plans", dict(specs=["", "dp=8", "dp=2,fsdp=2,tp=2", "tp=8"], flags=dict(batch_size=2, block_size=16, total_batch_tokens=1024))
    ),
    "fsdp bytes": lambda data_dir, out: ("fsdp_bytes", dict(spec="fsdp=8")),
    "step bytes": lambda data_dir, out: ("step_bytes", dict(flags=FIT_CHECK(data_dir), batch_sizes=list(range(1, 9)))),
    "one step": lambda data_dir, out: ("one_step", dict(specs=list(MESHES))),
    "same batch": lambda data_dir, out: ("fit_losses", dict(runs=same_batch_runs(data_dir, out))),
    # Two steps on dp=8 then the third on fsdp=4,tp=2 (batch 2: the same 8 sequences), against same batch's dp=8 run.
    "resume": lambda data_dir, out: ("fit_losses", dict(runs=[
        run_flags(data_dir, out / "cut", mesh="dp=8", max_iters=2, ckpt_interval=2, eval_interval=2),
        run_flags(data_dir, out / "cut", mesh="fsdp=4,tp=2", batch_size=2, resume=True, **THREE_STEPS),
    ])),  # fmt: skip
    "loss grads": lambda data_dir, out: ("loss_grads", dict(specs=["dp=2,fsdp=2,tp=2", "fsdp=8"], variants=VARIANTS)),
    "muon step": lambda data_dir, out: ("one_step", dict(specs=["fsdp=8", "dp=2,fsdp=2,tp=2"], muon=True)),  # tp=2 cuts c_attn between q, k and v
    # --optimizer muon: 3 steps on dp=8; 2 steps on dp=8 then the third on fsdp=4,tp=2 from the checkpoint.
    "muon resume": lambda data_dir, out: ("fit_losses", dict(runs=[
        run_flags(data_dir, out / "muon whole", mesh="dp=8", optimizer="muon", **THREE_STEPS),
        run_flags(data_dir, out / "muon cut", mesh="dp=8", optimizer="muon", max_iters=2, ckpt_interval=2, eval_interval=2),
        run_flags(data_dir, out / "muon cut", mesh="fsdp=4,tp=2", batch_size=2, optimizer="muon", resume=True, **THREE_STEPS),
    ])),  # fmt: skip
}


def uses(*cases):
    """Marks a test as reading these cases of the shared process (only the selected tests' run)."""

    def mark(test):
        test.cases = cases
        return test

    return mark


class Shared:
    """multi_device.cases running in the background; `[name]` waits for that case's result."""

    def __init__(self, cases, stderr_path):
        self.stderr_path, self.stderr = stderr_path, open(stderr_path, "w")
        command = [sys.executable, "multi_device.py", "cases", json.dumps({"cases": cases})]
        self.process = subprocess.Popen(command, cwd=TESTS, env=device_env(8), stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines, self.results = queue.Queue(), {}
        threading.Thread(target=lambda: [*map(self.lines.put, self.process.stdout), self.lines.put(None)], daemon=True).start()

    def __getitem__(self, name):
        while name not in self.results:
            try:
                line = self.lines.get(timeout=600)
            except queue.Empty:
                pytest.fail(f"no result of case {name!r} in 600 s")
            if line is None:
                self.process.wait()
                pytest.fail(f"multi_device.py ended (exit {self.process.returncode}) before case {name!r}:\n{self.tail()}")
            if line.startswith("["):  # a case's JSON line; anything else a library printed
                case, outcome = json.loads(line)
                self.results[case] = outcome
        outcome = self.results[name]
        if isinstance(outcome, dict) and "error" in outcome:
            pytest.fail(f"case {name!r} raised:\n{outcome['error']}")
        return outcome

    def tail(self):
        self.stderr.flush()
        with open(self.stderr_path) as f:
            return f.read()[-4000:]

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def shared(request, data_dir, tmp_path_factory):
    """The cases the selected tests of this module read, in one background process of 8 devices."""
    ours = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    wanted = {case for item in ours for case in getattr(item.function, "cases", ())}
    out = tmp_path_factory.mktemp("shared")
    cases = [[name, *build(data_dir, out)] for name, build in CASES.items() if name in wanted]
    process = Shared(cases, str(out / "stderr.txt"))
    yield process
    process.close()


# ---------------------------------------------------------------------------------------------
# Meshes and batches


@uses("mesh specs")
def test_mesh_specs_parse_and_bad_ones_name_what_fits(shared):
    meshes = shared["mesh specs"]
    assert meshes["dp=8"] == {"dp": 8, "fsdp": 1, "tp": 1}
    assert meshes["fsdp=-1,tp=2"] == {"dp": 1, "fsdp": 4, "tp": 2}
    assert meshes["dp=2,fsdp=2,tp=2"] == {"dp": 2, "fsdp": 2, "tp": 2}
    assert meshes["tp=2,dp=-1"] == {"dp": 4, "fsdp": 1, "tp": 2}
    assert meshes[""] == {"dp": 1, "fsdp": 1, "tp": 1}  # no --mesh: one device
    assert "unknown mesh axis 'pp'" in meshes["pp=2"] and "dp, fsdp and tp" in meshes["pp=2"]
    assert "uses 3 devices but there are 8" in meshes["dp=3"] and "1, 2, 4, 8" in meshes["dp=3"]
    assert "the other axes use 3 devices but there are 8" in meshes["dp=-1,tp=3"]
    assert "only one axis can be -1" in meshes["dp=-1,tp=-1"]
    assert "give dp a positive number of devices" in meshes["dp=two"]
    assert "give dp a positive number of devices" in meshes["dp=0,tp=8"]


@uses("batch plans")
def test_total_batch_tokens_sets_the_accumulation_over_the_data_parallel_ranks(shared):
    plans = shared["batch plans"]
    assert plans[""] == {"global_batch": 2, "grad_accum": 32}  # 1024 / (2 * 16)
    assert plans["dp=8"] == {"global_batch": 16, "grad_accum": 4}  # 1024 / (2 * 16 * 8)
    assert plans["dp=2,fsdp=2,tp=2"] == {"global_batch": 8, "grad_accum": 8}  # a tp group shares its batch
    assert plans["tp=8"] == {"global_batch": 2, "grad_accum": 32}


@uses("fsdp bytes")
def test_fsdp8_holds_an_eighth_of_the_params_and_optimizer_state_on_each_device(shared):
    held = shared["fsdp bytes"]
    for name in ("params", "opt_state"):
        per_device = held["per_device"][name]
        assert len(per_device) == 8
        for n_bytes in per_device.values():  # the optimizer's step counts are replicated: a few bytes more
            assert held["total"][name] / 8 <= n_bytes < 1.01 * held["total"][name] / 8, name


# ---------------------------------------------------------------------------------------------
# Scripts (these run while the shared process computes)


@pytest.mark.parametrize(
    "mesh, flags, message",
    [
        ("tp=8", {}, TP8_ERROR),
        ("dp=8", {"total_batch_tokens": 1000}, "--total_batch_tokens 1000 is not a multiple of the 128 tokens of a micro-batch"),
        ("dp=8", {"total_batch_tokens": 1024, "grad_accum": 2}, "--grad_accum 2 and --total_batch_tokens 1024 both set the accumulation"),
        ("dp=6", {}, "--mesh dp=6 uses 6 devices but there are 8"),
    ],
)
def test_a_mesh_the_model_or_batch_does_not_fit_is_a_one_line_error(mesh, flags, message, data_dir, tmp_path):
    args = [f"--{k}={v}" for k, v in run_flags(data_dir, tmp_path / "out", mesh=mesh, **flags).items() if v != ""]
    done = run_script("train_jax.py", *args)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr


def test_mesh_dp8_with_the_default_flags_trains_on_8_devices(data_dir, tmp_path):
    args = ["--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--data_url=", "--max_iters=1", "--eval_iters=1", "--peak_flops=1e9"]
    done = run_script("train_jax.py", "--mesh", "dp=8", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    start = next(line for line in done.stderr.splitlines() if "tokens/step" in line)
    assert "global batch 96 (12 per dp*fsdp rank) x 1 accumulation = 6144 tokens/step, 8 device(s)" in start  # 12 x 8 x 64
    assert "peak 1 GFLOP/s (--peak_flops)" in start  # faked CPU devices share the host's peak, not 8 times it


def compile_args(data_dir, mesh, batch_size, *more):
    flags = run_flags(data_dir, "out", mesh=mesh, batch_size=batch_size, n_layer=1)
    return ["train_jax.py", "compile", *[f"--{k}={v}" for k, v in flags.items() if v != ""], *more]


def test_compile_for_a_tpu_topology(data_dir):
    """With libtpu: the step compiled for a v5e-4 slice against its 16 GiB chips; without: the error says how to get it."""
    done = run_script(*compile_args(data_dir, "dp=4", 2, "--topology=v5e:2x2"))
    if importlib.util.find_spec("libtpu") is None:
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --topology v5e:2x2 needs libtpu")
        pytest.skip("libtpu is not installed (pip install -e \".[tpu]\"): checked the error only")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^TPU v5 lite x 4 \{'dp': 4, .* of 16.00 GiB per device, .*: fits$", done.stdout.strip())
    assert done.stderr == ""  # libtpu, told which slice it compiles for, does not warn that this host has none


def test_bfloat16_keeps_the_activations_in_bfloat16_in_the_program_compiled_for_a_tpu():
    """The bfloat16 step (remat block) compiled for a v5e-4 slice: every [batch, n_seq, n_embd] value
    (per device) that the program holds outside its fusions is bfloat16, the matmuls' [batch * n_seq,
    n_embd] rows too, and so are the block inputs the policy saves for the backward pass."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e \".[tpu]\"): there is no TPU program to read")
    flags = dict(vocab_size=320, n_layer=2, n_head=2, n_embd=96, block_size=64, batch_size=4, mesh="dp=4", dtype="bfloat16", remat="block")
    found = on_devices("activation_dtypes", topology="v5e:2x2", flags=flags)
    assert found["activations"].get("bf16") and found["rows"].get("bf16") and found["saved"].get("bf16"), found
    assert not any("f32" in counts for counts in found.values()), found


def test_splash_attention_compiled_for_a_tpu_holds_no_scores_where_the_math_does():
    """The step compiled for a v5e-4 slice: with --attention math the program holds the [batch, head,
    T, T] scores of each device's sequences; with splash, whose kernels compute them a tile at a time, never."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e \".[tpu]\"): there is no TPU program to read")
    flags = dict(vocab_size=320, n_layer=1, n_head=2, n_embd=128, block_size=256, batch_size=4, mesh="dp=4", dtype="bfloat16")
    assert on_devices("attention_scores", topology="v5e:2x2", flags=flags, attentions=["math", "splash"]) == {"math": True, "splash": False}


@pytest.mark.parametrize("mesh, prompts", [("fsdp=2,tp=4", [PROMPT]), ("dp=2,fsdp=4", [PROMPT, "Hello, my name is"])])
def test_generation_under_a_mesh_writes_the_unsharded_text(mesh, prompts, tf_model, capsys):
    import gpt2

    args = [*prompts, "--model_size", tf_model[0], "--n_tokens_to_generate", "12", "--nostop_at_eot"]
    gpt2.cli(args)
    expected = capsys.readouterr().out
    done = run_script("gpt2.py", *args, "--mesh", mesh)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected and len(expected.strip()) > len(prompts) * 12


def test_generation_mesh_errors_are_one_line(tf_model):
    done = run_script("gpt2.py", PROMPT, "--model_size", tf_model[0], "--mesh", "tp=8")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {TP8_ERROR}"


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"coordinator_address": "10.0.0.1"}, "--coordinator_address '10.0.0.1' must be HOST:PORT of process 0"),
        ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 2}, "--process_id 2 must be an integer from 0 to"),
        ({"num_processes": 2, "process_id": 1}, "--num_processes and --process_id need --coordinator_address"),
    ],
)
def test_bad_multi_host_flags_name_the_fix(flags, message):
    from cli import UserError
    from sharding import initialize_distributed

    with pytest.raises(UserError) as error:
        initialize_distributed(**flags)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------
# Sharded results against unsharded ones


@uses("step bytes")
def test_compile_local_says_whether_the_step_fits_and_the_largest_batch_that_does(data_dir, shared):
    needed = shared["step bytes"]  # the programs are in the compilation cache now: the scripts below load them
    done = run_script(*compile_args(data_dir, "dp=8", 8))
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"cpu x 8 .*--batch_size 8 per rank.* of .* per device, [\d.]+ TFLOP per step per device \(6N \+ attention\): fits$", done.stdout.strip())
    limit = needed["2"]  # what two sequences per rank need: 8 do not fit, 2 do
    done = run_script(*compile_args(data_dir, "dp=8", 8, f"--device_memory={limit}"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.strip().endswith("does not fit")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    largest = max(int(b) for b, n in needed.items() if n <= limit)
    assert len(errors) == 1 and f"the largest --batch_size that fits is {largest} (per dp*fsdp rank)" in errors[0]
    assert re.search(r"needs [\d.]+ MiB per device but a cpu holds [\d.]+ MiB", errors[0])


@uses("one step")
def test_one_train_step_under_each_mesh_equals_the_unsharded_step(shared):
    steps = dict(shared["one step"])
    expected = steps.pop("unsharded")["loss"]
    for mesh, step in steps.items():
        assert step["loss"] == pytest.approx(expected, rel=LOSS_TOLERANCE), mesh
        # Adam's first step moves a weight by lr * g / (|g| + 1e-8) = +-lr (lr = 1e-2): a gradient's
        # float32 rounding (relative LOSS_TOLERANCE, ~7e-6) changes that only for gradients within
        # that rounding of 1e-8 of zero; 5e-3 lr lets through none of the lr-sized moves a wrongly
        # split gradient makes. (A bound from the loss alone cannot be had: see issue-10 report.)
        assert step["max_param_diff"] < 5e-3 * 1e-2, mesh
    # The train state stacks the blocks ([n_layer, ...]): the layer axis is never split, so fsdp
    # gathers one layer at a time; each layer's dimensions are split as the rules say.
    assert steps["dp=8"]["specs"]["blocks/attn/c_attn/w"] == "P(None, None, None)"  # dp replicates the weights
    assert steps["fsdp=8"]["specs"]["blocks/attn/c_attn/w"] == "P(None, None, 'fsdp')"  # the largest dimension
    assert steps["fsdp=8"]["specs"]["blocks/mlp/c_proj/w"] == "P(None, 'fsdp', None)"
    assert steps["dp=2,tp=4"]["specs"]["blocks/attn/c_attn/w"] == "P(None, None, 'tp')"  # column-parallel
    assert steps["dp=2,tp=4"]["specs"]["blocks/mlp/c_proj/w"] == "P(None, 'tp', None)"  # row-parallel
    assert steps["dp=2,tp=4"]["specs"]["wte"] == "P('tp', None)"  # split over the vocabulary
    assert steps["dp=2,tp=4"]["specs"]["ln_f/g"] == "P(None,)"
    assert steps["dp=2,fsdp=2,tp=2"]["specs"]["blocks/mlp/c_fc/w"] == "P(None, 'fsdp', 'tp')"


@uses("muon step")
def test_one_muon_step_under_each_mesh_equals_the_unsharded_step(shared):
    """Muon orthogonalizes whole matrices whatever their shards: a step of the [2, 8, 16] batch (2
    micro-batches accumulated) under each mesh moves the params as on one device, and each matrix's
    momentum is split as the matrix."""
    steps = dict(shared["muon step"])
    expected = steps.pop("unsharded")["loss"]
    for mesh, step in steps.items():
        assert step["loss"] == pytest.approx(expected, rel=LOSS_TOLERANCE), mesh
        assert step["max_param_diff"] < 5e-3 * 1e-2, mesh  # AdamW's params: as in the AdamW step above
        # The gradients differ by float32 rounding (relative LOSS_TOLERANCE); Newton-Schulz grows a
        # difference at most NEWTON_SCHULZ_GROWTH-fold, relative to the update. A matrix orthogonalized
        # shard by shard would be off by its whole size.
        assert step["muon_relative_diff"] < NEWTON_SCHULZ_GROWTH * LOSS_TOLERANCE, mesh
        assert step["moment_specs"] == {path: spec for path, spec in step["specs"].items() if path in step["moment_specs"]}, mesh
        assert len(step["moment_specs"]) == 4, mesh  # c_attn, attn's c_proj, c_fc, mlp's c_proj
    assert steps["fsdp=8"]["moment_specs"]["blocks/mlp/c_proj/w"] == "P(None, 'fsdp', None)"


@uses("muon resume")
def test_a_muon_checkpoint_saved_under_dp8_resumes_under_fsdp4_tp2_with_the_same_next_loss(shared):
    whole, first, resumed = shared["muon resume"]
    assert list(whole) == ["1", "2", "3"] and list(resumed) == ["3"]
    assert first["2"] == pytest.approx(whole["2"], rel=2 * LOSS_TOLERANCE)
    # the third step's loss from the restored Muon momentum, on another mesh: Newton-Schulz may grow the
    # second step's rounding, which then moves the loss by its (small) share
    assert resumed["3"] == pytest.approx(whole["3"], rel=3 * LOSS_TOLERANCE * NEWTON_SCHULZ_GROWTH)
    assert resumed["3"] != pytest.approx(first["1"], rel=100 * LOSS_TOLERANCE)


@uses("same batch")
def test_batch_size_counts_per_data_parallel_rank_so_each_mesh_trains_the_same_batch(shared):
    """One device with 8 sequences, dp=8 and fsdp=8 with 1 each, dp=2,fsdp=2,tp=2 with 2 each: the same
    global batch, so the same losses step for step (float32 reduction order apart)."""
    expected, *others = shared["same batch"]
    assert list(expected) == ["1", "2", "3"]
    for (mesh, _), losses in zip(SAME_BATCH[1:], others):
        assert losses == pytest.approx(expected, rel=1e-5), mesh  # ~100 eps: sums over 128 tokens, through 2 AdamW steps


@uses("same batch", "resume")
def test_checkpoint_saved_under_dp8_resumes_under_fsdp4_tp2_with_the_same_next_loss(shared):
    whole = shared["same batch"][1]  # dp=8, 3 steps
    first, resumed = shared["resume"]
    assert list(resumed) == ["3"]
    assert first["2"] == pytest.approx(whole["2"], rel=2 * LOSS_TOLERANCE)  # the same mesh: 2 steps, no difference expected
    assert resumed["3"] == pytest.approx(whole["3"], rel=3 * LOSS_TOLERANCE)  # 3 steps, the 3rd on another mesh
    assert resumed["3"] != pytest.approx(first["1"], rel=100 * LOSS_TOLERANCE)  # the step learned from the restored state


@uses("same batch")
def test_two_processes_of_4_devices_give_the_losses_of_one_process_of_8(data_dir, tmp_path, shared):
    """The run of dp=2,fsdp=2,tp=2 (same batch's, in one process of 8 devices) as a job of two processes of 4."""
    address = f"127.0.0.1:{free_port()}"
    job = dict(coordinator_address=address, num_processes=2)
    flags = dict(mesh="dp=2,fsdp=2,tp=2", batch_size=2, **THREE_STEPS)
    processes = [
        start("fit_losses", 4, runs=[run_flags(data_dir, tmp_path / "two", **flags, **job, process_id=i)]) for i in range(2)
    ]
    per_process = [result(p) for p in processes]
    expected = shared["same batch"][SAME_BATCH.index(("dp=2,fsdp=2,tp=2", 2))]
    assert list(expected) == ["1", "2", "3"]
    for (losses,) in per_process:
        assert losses == pytest.approx(expected, rel=3 * LOSS_TOLERANCE)  # 3 steps
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "3")  # orbax saved across the processes


@uses("loss grads")
def test_remat_chunked_loss_and_fused_attention_give_the_plain_loss_and_gradients_sharded_and_not(shared):
    results = shared["loss grads"]
    assert len(results) == 3 * len(VARIANTS)
    for name, difference in results.items():
        # float32: a loss and gradients summed in another order over 128 tokens and 64 logits differ by a few
        # eps (1.2e-7) times the sqrt of the reduction length (~90) relative to their scale
        assert difference["loss"] < 1e-6 and difference["grads"] < 1e-5, name
