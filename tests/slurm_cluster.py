"""A private one-node SLURM cluster on 127.0.0.1 for the ``cluster`` tests (Debian's slurm-wlm + munge).

:func:`start` writes a slurm.conf and a munge key under one temporary folder, starts munged,
slurmctld and slurmd with their own state, spool, log, pid and socket files and their own free ports,
and returns a :class:`Cluster`; :meth:`Cluster.stop` kills exactly those daemons by the pids they were
started with (and the processes SLURM started for jobs, by the job ids it was given).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env={**os.environ, **self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=kw.pop("timeout", 120), **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        job = self.run("sbatch", "--parsable", *args, env=env or {}).stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "GONE"

    def restarts(self, job: str) -> int:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        return next((int(w.split("=", 1)[1]) for w in out.split() if w.startswith("Restarts=")), 0)

    def wait(self, job: str, timeout: float = 600) -> str:
        """Wait until the job has left the queue for good; its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {self.job_state(job)} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("log/*.log")))

    def stop(self) -> None:
        for job in self.jobs:
            self.run("scancel", "--signal=KILL", "--full", job, check=False, timeout=30)
        for job in self.jobs:  # processes of our jobs end before slurmd does
            deadline = time.monotonic() + 30
            while self.job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE") and time.monotonic() < deadline:
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def leftover_processes(root: Path, pids) -> list[str]:
    """Live (not zombie) processes that are our daemons, or that run with our slurm.conf or under ``root``."""
    conf = f"SLURM_CONF={root / 'slurm.conf'}".encode()
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if "\nState:\tZ" in (proc / "status").read_text():
                continue
            cmdline = (proc / "cmdline").read_bytes()
            ours = int(proc.name) in set(pids) or conf in (proc / "environ").read_bytes() or str(root).encode() in cmdline
        except OSError:
            continue
        if ours:
            left.append(f"{proc.name}: {cmdline.replace(bytes(1), b' ').decode(errors='replace')[:200]}")
    return left


def _wait_for(path: Path, what: str, cluster: Cluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start\n{cluster.logs()}")
        time.sleep(0.1)


def start(root: Path) -> Cluster:
    """Start munged, slurmctld and slurmd under ``root``; the caller must call ``stop()`` (a fixture's finally)."""
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    socket_path = root / "munge" / "munge.socket"
    ctld_port, d_port = _free_ports(2)
    user = getpass.getuser()
    cpus = 2
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=zscltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={socket_path},cred_expire=10
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    env = {"SLURM_CONF": str(conf)}
    cluster = Cluster(root, env)
    try:
        subprocess.run([_bin("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                        f"--seed-file={root / 'munge' / 'munged.seed'}"], check=True, timeout=30)
        _wait_for(root / "run" / "munged.pid", "munged", cluster)
        cluster.pids["munged"] = int((root / "run" / "munged.pid").read_text())
        subprocess.run([_bin("slurmctld"), "-c", "-f", str(conf)], check=True, timeout=30, env={**os.environ, **env})
        _wait_for(root / "run" / "slurmctld.pid", "slurmctld", cluster)
        cluster.pids["slurmctld"] = int((root / "run" / "slurmctld.pid").read_text())
        subprocess.run([_bin("slurmd"), "-f", str(conf), "-N", "localhost"], check=True, timeout=30, env={**os.environ, **env})
        _wait_for(root / "run" / "slurmd.pid", "slurmd", cluster)
        cluster.pids["slurmd"] = int((root / "run" / "slurmd.pid").read_text())
        deadline = time.monotonic() + 60
        while True:
            state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not become idle ({state!r})\n{cluster.logs()}")
            time.sleep(0.3)
    except BaseException:
        cluster.stop()
        raise
    return cluster
