"""A real two-node Slurm cluster on this machine, for the tests marked `slurm`.

Debian's slurm-wlm + munge (installed if missing; CI runs as root), one slurmctld and two
slurmd "nodes" n1, n2 on loopback with their own ports, state in a temp directory.
SLURM_CONF is exported before any Slurm command runs: a client without a config looks
the controller up in DNS, traffic off this machine (shared/NOTES.md). Everything is torn
down by PID at the end; the one /etc/hosts line naming n1 and n2 is removed again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurm-client", "munge"]
HOSTS_LINE = "127.0.0.1 n1 n2  # launcher tests: two slurmd nodes on loopback"
NODES = ("n1", "n2")


def _run(*cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", timeout=600, env=env)
    _run("apt-get", "install", "-y", "--no-install-recommends", *PACKAGES, timeout=900, env=env)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class Cluster:
    def __init__(self, root: Path, gpus: int = 0, ports: int = 0, fewer_cpus_on_n2: bool = False):
        """`gpus` per node: device files of our own stand in for them (Slurm counts them, hands
        them out and sets CUDA_VISIBLE_DEVICES by file; nothing opens them). `ports` shifts
        every port, for a second cluster beside the first (it reuses the first's munged and
        /etc/hosts line). `fewer_cpus_on_n2`: n2 has half n1's CPUs."""
        self.root = root
        self.gpus = gpus
        self.fewer_cpus_on_n2 = fewer_cpus_on_n2
        self.cpus = max(8, os.cpu_count() or 2)  # n1's (config_overrides: slurmd accepts more than the host has)
        self.ports = ports
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False
        self.added_hosts = False

    # ---- lifecycle

    def start(self) -> "Cluster":
        install()
        os.environ["SLURM_CONF"] = str(self.conf)  # before the first Slurm command, always
        for sub in ("etc", "state", "log", "spool/n1", "spool/n2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        self._start_munge()
        self._add_hosts()
        _run("slurmctld", "-i", "-c", env=self.env)
        for node in NODES:
            _run("slurmd", "-N", node, env=self.env)
        self._wait_idle()
        return self

    def stop(self) -> None:
        pids = [_pid(self.root / f"slurmd-{n}.pid") for n in NODES] + [_pid(self.root / "slurmctld.pid")]
        if self.started_munge:
            pids.append(_pid(Path("/run/munge/munged.pid")))
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.added_hosts:
            hosts = Path("/etc/hosts")
            hosts.write_text("".join(line for line in hosts.read_text().splitlines(keepends=True) if line.strip() != HOSTS_LINE))
        if not os.environ.get("LAUNCHER_KEEP_SLURM_DIR"):  # for debugging a failed job
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- pieces

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = self.cpus
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8) // 2
        r = self.root
        gres = ""
        if self.gpus:
            (r / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus):  # character devices, as Slurm wants (nvidia's major number); never opened
                os.mknod(r / "dev" / f"nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(195, i))
            (r / "etc" / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu File={r}/dev/nvidia[0-{self.gpus - 1}]\n")
            gres = f"Gres=gpu:{self.gpus} "
        p = self.ports
        node = f"NodeHostname={host} NodeAddr=127.0.0.1 {gres}RealMemory={mem}"
        nodes = (f"NodeName=n1 Port={17001 + p} CPUs={cpus} {node}\nNodeName=n2 Port={17002 + p} CPUs={cpus // 2} {node}"
                 if self.fewer_cpus_on_n2 else f"NodeName=n[1-2] Port=[{17001 + p}-{17002 + p}] CPUs={cpus} {node}")
        self.conf.write_text(f"""\
ClusterName=launchertest{p or ""}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={16817 + p}
{"GresTypes=gpu" if self.gpus else ""}
AuthType=auth/munge
# A requeued job waits this long before it may start again (default 120 s): the credential
# of its previous attempt must expire first.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=30
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        if _run("munge", "-n", check=False).returncode == 0:
            return  # a munged is already running here
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            _run("mungekey", "--create")
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        self.started_munge = True

    def _add_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        if HOSTS_LINE not in hosts.read_text():
            with hosts.open("a") as f:
                f.write(("" if hosts.read_text().endswith("\n") else "\n") + HOSTS_LINE + "\n")
            self.added_hosts = True

    def node_states(self) -> dict:
        # sinfo blocks against a dead controller: always with a deadline of its own
        proc = _run("timeout", "5", "sinfo", "-N", "-h", "-o", "%N %T", check=False, env=self.env)
        return dict(line.split() for line in proc.stdout.splitlines() if line.strip())

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.node_states()
            if set(states) == set(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        proc = subprocess.CompletedProcess([], 0, stdout=str(self.node_states()))
        log = (self.root / "log" / "slurmctld.log")
        raise RuntimeError(f"slurm nodes not idle after {timeout}s: {proc.stdout!r}\n"
                           f"{log.read_text()[-2000:] if log.is_file() else ''}")

    # ---- helpers for tests

    def job_state(self, job_id: str) -> dict:
        out = _run("scontrol", "show", "job", "-o", job_id, env=self.env).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: str, timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id).get('JobState')} after {timeout}s")
