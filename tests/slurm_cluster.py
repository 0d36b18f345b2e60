"""A real one-node SLURM cluster (munge + slurmctld + slurmd) living in a temporary directory.

Debian's `slurmctld slurmd slurm-client munge` packages are all it needs (.ci/run installs
them); nothing under /etc is read or written: the config, munge key, sockets, spool, state
and logs all sit in `root`, clients find them through SLURM_CONF, and the ports are free
ones picked at start. The daemons run as the current user (root in CI, like slurmd on a real
node, which must be able to start tasks).

    python tests/slurm_cluster.py /tmp/cluster   # start one by hand; Ctrl-C stops it
"""

import getpass
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
SBIN = ("/usr/sbin", "/sbin")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if _which(name) is None]


def _which(name):
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=jaxlmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
SchedulerType=sched/backfill
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what sbatch/squeue/... need."""

    def __init__(self, root: pathlib.Path, cpus: int = 2):
        self.root = pathlib.Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> "SlurmCluster":
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                root=self.root,
                user=getpass.getuser(),
                cpus=self.cpus,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
            )
        )
        munge = self.root / "munge"
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={self.root}/log/munged.log",
                f"--seed-file={munge}/munged.seed",
            ]
        )
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged's socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for(
            lambda: self._run("scontrol", "ping").stdout.count("UP") >= 1,
            timeout,
            "slurmctld to answer `scontrol ping`",
        )
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self.wait_idle(timeout)
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the node runs nothing (a job's last run is cleaned up, not only ended)."""
        self._wait_for(self._node_idle, timeout, f"node {self.host} to be idle")

    def _spawn(self, command):
        with open(self.root / "log" / f"{command[0]}.stdout", "ab") as log:
            self._daemons.append(
                subprocess.Popen(
                    [_which(command[0]), *command[1:]],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def _run(self, *command, check=False):
        return subprocess.run(
            [_which(command[0]), *command[1:]],
            env=self.env,
            text=True,
            capture_output=True,
            check=check,
            timeout=60,
        )

    def _node_idle(self) -> bool:
        return self._run("sinfo", "-h", "-N", "-o", "%t").stdout.strip() == "idle"

    def _wait_for(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self._daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; logs: {self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout} s for {what}; logs: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").iterdir())
        )

    def stop(self) -> None:
        """Cancel every job, then stop the daemons in reverse order (slurmd first)."""
        if self._daemons and self._daemons[0].poll() is None:
            self._run("scancel", "--user", getpass.getuser())
        for process in reversed(self._daemons):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._daemons.clear()

    # What the tests use.

    def sbatch(self, *args, cwd, env=None) -> int:
        """Submit with `env` (default: this process's) as the job's environment; returns the
        job id."""
        result = subprocess.run(
            [_which("sbatch"), "--parsable", *map(str, args)],
            cwd=cwd,
            env={**(env or os.environ), "SLURM_CONF": str(self.conf)},
            text=True,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self._run("scontrol", "-o", "show", "job", str(job_id), check=True).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(
        self,
        job_id: int,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
        timeout=300,
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")

    def scancel(self, *args):
        return self._run("scancel", *map(str, args), check=True)

    def scontrol(self, *args):
        return self._run("scontrol", *map(str, args), check=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on kill too
    cluster = SlurmCluster(pathlib.Path(sys.argv[1])).start()
    print(f"SLURM up; export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
