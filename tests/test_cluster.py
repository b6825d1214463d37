"""Cluster runs for real: a private SLURM cluster (tests.slurm_cluster), preemption and requeue with an
exact resume, signals outside SLURM, and multi-node launches (torchrun, srun) on 127.0.0.1, CPU + gloo.

The oracle of every check is a run the code under test did not make differently: the one-process
`zscl sequence` of the same tiny sequence (the same accuracy matrix, and the same all-reduced gradient
of the first iteration), or the uninterrupted run in the same launch setting (bit-identical results and
exported weights). Runs stop at a known step through ZSCL_PAUSE_AT (zscl.utils.testing): the process
waits there until a signal arrives, so no test depends on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests import slurm_cluster, snapshots
from tests.test_sequence import REPO, assert_same_run, read_results, run_zscl, snapshot_args
from tests.tiny_world import world_with_start

STEPS = 6
INTERRUPTED = 75  # zscl.utils.signals.EXIT_INTERRUPTED, restated: the documented exit status
ENV = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
CLEAN_LOG = ("sync_dist=True", "`srun` command is available")  # Lightning hints that must not appear (issue 23)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return world_with_start(tmp_path_factory.mktemp("cluster-world"), STEPS)


def args(world: Path, out: Path, *extra: str) -> list[str]:
    """The tiny ZSCL sequence, checkpoints every 2 steps (batch size from the benchmark: 4 per process)."""
    return ["--config", str(world / "tiny" / "benchmark.yaml"), "--config", "method/zscl", "--out", str(out),
            "--checkpoint_every", "2", "--progress", "none", "--model.init_from", str(world / "tiny" / "start.safetensors"),
            *extra]


@pytest.fixture(scope="module")
def one_process(world) -> Path:
    out = world / "runs" / "one"
    run_zscl("sequence", *args(world, out, *snapshot_args(out / "snapshots")), env=ENV)
    return out


def assert_equals_one_process(out: Path, one: Path) -> None:
    """Two ranks x batch 2 = one process x batch 4: the same matrix, and iteration 0's all-reduced gradient."""
    assert read_results(out)["zero_shot"] == read_results(one)["zero_shot"]
    assert read_results(out)["accuracy"] == read_results(one)["accuracy"]
    single = snapshots.load(one / "snapshots", "TinyColors")
    for rank in (0, 1):
        grads = snapshots.load(out / "snapshots", "TinyColors", rank)["grads0"]
        for key, grad in single["grads0"].items():
            tol = 1e-5 * grad.abs().max().item() + 1e-12
            torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=tol, msg=lambda m: f"rank {rank} {key}: {m}")


def assert_clean(log: str) -> None:
    for text in CLEAN_LOG:
        assert text not in log, f"the log has Lightning's {text!r} hint:\n{log[-3000:]}"


# ---------------------------------------------------------------- signals outside SLURM (no cluster needed)
def paused(args_: list[str], marker: Path, at: str, ranks: int = 1, **popen) -> subprocess.Popen:
    """Start zscl, stopping after step K of task T (at='T:K') until a signal arrives; return once paused."""
    env = {**os.environ, **ENV, "ZSCL_PAUSE_AT": at, "ZSCL_PAUSE_FILE": str(marker), **popen.pop("env", {})}
    proc = subprocess.Popen([sys.executable, "-m", "zscl", *args_], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    wait_for_markers(marker, ranks, proc)
    return proc


def wait_for_markers(marker: Path, ranks: int, proc=None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(Path(f"{marker}.{r}").exists() for r in range(ranks)):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before the pause:\n{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the run never reached the pause point"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_the_step_and_rerun_resumes_bit_identically(world, one_process, signum, tmp_path):
    out = world / "runs" / f"signal-{signum.name}"
    proc = paused(["sequence", *args(world, out)], tmp_path / "paused", "1:3")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED, stderr[-3000:]
    ckpt = out / "tasks" / "01-TinyStripes" / "last.ckpt"
    lines = [line for line in stderr.splitlines() if line.startswith("zscl sequence:")]
    assert lines == [f"zscl sequence: stopped by {signum.name} at task 2/2 (01-TinyStripes) step 3; checkpoint {ckpt}; "
                     "rerun the same command to resume"], stderr[-3000:]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3, "not the periodic one (step 2)"
    rerun = run_zscl("sequence", *args(world, out), env=ENV)
    assert f"stopped after {signum.name} at task 2/2 (01-TinyStripes) step 3; resumed from {ckpt}" in rerun.stdout
    assert_same_run(out, one_process)


def test_second_sigint_exits_at_once():
    code = ("import os, signal\nfrom zscl.utils import signals\nsignals.install()\n"
            "os.kill(os.getpid(), signal.SIGINT)\nprint('recorded', signals.received(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\nprint('still running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGINT and proc.stdout == f"recorded {int(signal.SIGINT)}\n", (proc.stdout, proc.stderr)


@pytest.mark.slow
def test_fit_stops_on_sigint_with_a_checkpoint_and_the_resume_command(world, tmp_path):
    from tests.tiny_world import task_yaml

    task = task_yaml(world, tmp_path / "task.yaml", "TinyStripes", steps=STEPS, default_root_dir=tmp_path / "fit")
    proc = paused(["fit", "--config", "method/finetune", "--config", str(task)], tmp_path / "paused", "0:3")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED, stderr[-3000:]
    line = next(line for line in stderr.splitlines() if line.startswith("zscl fit:"))
    ckpt = Path(line.split("checkpoint ")[1].split(";")[0])
    assert "stopped by SIGINT at zscl fit step 3" in line and "--ckpt_path" in line
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    assert not (tmp_path / "fit" / "TinyStripes.safetensors").exists(), "an interrupted fit exports nothing"


@pytest.mark.slow
def test_a_lightning_hpc_checkpoint_is_never_resumed_from(world, tmp_path):
    """zscl's task checkpoint is the single source of truth: Lightning would load hpc_ckpt_*.ckpt from the run
    folder on its own under SLURM, so such a file stops the run (exit 2) before any training."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "hpc_ckpt_1.ckpt").write_bytes(b"not ours")
    proc = run_zscl("sequence", *args(world, out), check=False, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{out / 'hpc_ckpt_1.ckpt'} is a Lightning SLURM checkpoint; zscl resumes only from its own" in proc.stderr
    assert not (out / "checkpoints").exists() and not list(out.rglob("last.ckpt")), "nothing was trained"


# ---------------------------------------------------------------- multi-node torchrun on 127.0.0.1
@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_process(world, one_process):
    out = world / "runs" / "torchrun"
    port = slurm_cluster._free_ports(1)[0]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "zscl-test"]
    zscl = ["-m", "zscl", "sequence", *args(world, out, "--data.batch_size", "2", "--trainer.num_nodes", "2",
                                         "--trainer.devices", "1", "--trainer.strategy", "ddp",
                                         *snapshot_args(out / "snapshots"))]
    env = {**os.environ, **ENV}
    procs = [subprocess.Popen([*launch, "--node_rank", str(r), *zscl], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    log = "\n".join(logs)
    assert "cluster environment: TorchElasticEnvironment (world size 2, 2 node(s) x 1 device(s))" in log, log[-3000:]
    assert_clean(log)
    assert_equals_one_process(out, one_process)


# ---------------------------------------------------------------- the SLURM lane
@pytest.fixture(scope="module")
def cluster():
    missing = slurm_cluster.missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge")
    root = Path(tempfile.mkdtemp(prefix="zscl-slurm-"))
    started = slurm_cluster.start(root)
    try:
        yield started
    finally:
        pids = dict(started.pids)
        started.stop()
        left = slurm_cluster.leftover_processes(root, pids.values())
        assert not left, f"processes started by the cluster tests are still running: {left}"


def template_env(world: Path, **extra: str) -> dict[str, str]:
    """What the cluster test sets for scripts/slurm_mtil.sh: the tiny sequence, CPU + gloo, batch 2 per task."""
    return {**ENV, "ZSCL_BENCHMARK": str(world / "tiny" / "benchmark.yaml"), "ZSCL_METHOD": "method/zscl",
            "ZSCL_BATCH_SIZE": "2", "ZSCL_NUM_WORKERS": "0", "ZSCL_ACCELERATOR": "cpu",
            "ZSCL_CMD": f"{sys.executable} -m zscl", **extra}


def submit_template(cluster, world: Path, out: Path, *extra: str, env: dict | None = None) -> tuple[str, Path]:
    """sbatch scripts/slurm_mtil.sh on the one node: 2 tasks, no GPU, all of the node's memory."""
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job = cluster.sbatch("--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0",
                         f"--output={log}", "--chdir", str(REPO), "scripts/slurm_mtil.sh", str(world), str(out),
                         "--checkpoint_every", "2", "--progress", "none",
                         "--model.init_from", str(world / "tiny" / "start.safetensors"), *extra,
                         env=template_env(world, **(env or {})))
    return job, log


@pytest.fixture(scope="module")
def slurm_run(cluster, world) -> tuple[Path, str]:
    out = world / "runs" / "slurm"
    job, log = submit_template(cluster, world, out, *snapshot_args(out / "snapshots"))
    assert cluster.wait(job) == "COMPLETED", log.read_text()[-5000:] + cluster.logs()
    return out, log.read_text()


@pytest.mark.cluster
def test_sbatch_template_two_tasks_equal_one_process(slurm_run, one_process):
    out, log = slurm_run
    assert "cluster environment: SLURMEnvironment (world size 2, 1 node(s) x 2 device(s))" in log, log[-3000:]
    assert log.count("zscl sequence: tiny, 2 tasks") == 1, "rank 1 prints nothing"
    assert_clean(log)
    assert_equals_one_process(out, one_process)
    assert not list(out.glob("hpc_ckpt_*.ckpt")), "Lightning's auto-requeue is off: no hpc_ckpt files"


def interrupt_job(cluster, world: Path, name: str, how) -> tuple[Path, str, str]:
    """Submit the template, pause both ranks after step 3 of task 2, interrupt with ``how(job)``, wait."""
    out = world / "runs" / name
    marker = world / "runs" / f"{name}.paused"
    job, log = submit_template(cluster, world, out, env={"ZSCL_PAUSE_AT": "1:3", "ZSCL_PAUSE_FILE": str(marker)})
    wait_for_markers(marker, 2)
    how(job)
    state = cluster.wait(job)
    assert state == "COMPLETED", f"{state}\n{log.read_text()[-5000:]}"
    assert cluster.restarts(job) == 1, log.read_text()[-5000:]
    return out, log.read_text(), job


@pytest.mark.cluster
def test_sigusr1_preemption_requeues_and_resumes_bit_identically(cluster, world, slurm_run):
    """What SLURM does at --signal=USR1@120 before the time limit (here sent now, with scancel, to the job's
    tasks as SLURM sends it): checkpoint, requeue, exit; the requeued job finishes the run exactly."""
    out, log, job = interrupt_job(cluster, world, "usr1", lambda job: cluster.run("scancel", "--signal=USR1", job))
    ckpt = out / "tasks" / "01-TinyStripes" / "last.ckpt"
    assert f"SIGUSR1 at task 2/2 (01-TinyStripes) step 3; checkpoint {ckpt}; requeued SLURM job {job}" in log, log[-5000:]
    assert f"requeued after SIGUSR1 at task 2/2 (01-TinyStripes) step 3; resumed from {ckpt} (SLURM job {job}, restart 1)" in log
    assert log.count("zscl sequence: tiny, 2 tasks") == 2, "the requeued job ran the script again"
    assert not list(out.glob("hpc_ckpt_*.ckpt"))
    assert_same_run(out, slurm_run[0])


@pytest.mark.cluster
def test_template_asks_for_requeue_and_the_warning_signal(cluster, world):
    script = (REPO / "scripts" / "slurm_mtil.sh").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@" in script and "#SBATCH --open-mode=append" in script
    job = cluster.sbatch("--hold", "--gpus-per-node=0", "--mem=0", "--cpus-per-task=1", "--ntasks-per-node=2",
                         "--output=/dev/null", "--chdir", str(REPO), "scripts/slurm_mtil.sh", "x", "y")
    shown = cluster.run("scontrol", "show", "job", job).stdout
    cluster.run("scancel", job)
    assert "Requeue=1" in shown and "NumTasks=2" in shown, shown


@pytest.mark.cluster
def test_scontrol_requeue_resumes_bit_identically(cluster, world, slurm_run):
    out, log, job = interrupt_job(cluster, world, "requeue", lambda job: cluster.run("scontrol", "requeue", job))
    ckpt = out / "tasks" / "01-TinyStripes" / "last.ckpt"
    # SLURM ends the job's tasks with SIGTERM (then SIGKILL after KillWait): zscl checkpoints at the step
    assert f"after SIGTERM at task 2/2 (01-TinyStripes) step 3; resumed from {ckpt} (SLURM job {job}, restart 1)" in log, log[-5000:]
    assert_same_run(out, slurm_run[0])


# srun with 2 tasks as 2 "nodes" (--trainer.num_nodes 2 --trainer.devices 1) cannot run on one machine:
# Debian's slurmd runs one node per host (no --enable-multiple-slurmd), so both tasks land on one node,
# SLURM sets SLURM_NTASKS_PER_NODE=2, and Lightning refuses devices=1 there ("You set `devices=1` in
# Lightning, but the number of tasks per node configured in SLURM `--ntasks-per-node=2` does not match").
# Two nodes are covered by the torchrun test above.
