"""`sbatch slurm/train.sh` against a real two-node Slurm cluster on this machine (slurm_cluster.py).

The cluster needs root (to install slurm-wlm/munge if missing and to run slurmd); CI runs as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, OFFLINE_ENV, ROOT, TINY, TWELVE_STEPS, all_runs, check, launcher, mlflow_client

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SCRIPT = ROOT / "slurm" / "train.sh"
STEPS = TWELVE_STEPS  # the steps of the shared one-process reference (conftest.twelve_steps)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a real Slurm cluster needs root to install and run slurmd (CI runs as root)")
    from slurm_cluster import Cluster

    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield c
    finally:
        c.stop()


def _env(cluster, out: Path, **extra) -> dict:
    # Jobs inherit the submitter's environment: the venv's python by absolute path.
    return {**cluster.env, **OFFLINE_ENV, "PYTHON": sys.executable, "OUTPUT_DIR": str(out), **extra}


def sbatch(cluster, out: Path, *args: str, wait: bool = False, nodes: str = "2", **env) -> tuple[str, subprocess.CompletedProcess]:
    cmd = ["sbatch", "--parsable", "--nodes", nodes, "--cpus-per-task", "2", "--output", str(out / "slurm-%j.out"),
           *(["--wait"] if wait else []), str(SCRIPT), str(TINY), *FAST, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cluster, out, **env), capture_output=True, text=True, timeout=900)
    job_id = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else ""
    return job_id, proc


def render(cluster, nodes: int, nodelist: str, gpus: str | None = None, **extra: str) -> str:
    env = {**cluster.env, "LAUNCHER_DRY_RUN": "1", "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist,
           "SLURM_JOB_ID": "4242", "SLURM_NODEID": "0", "PYTHON": "/venv/bin/python", **extra}
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = gpus
    for name in ("GPUS_PER_NODE", "OMP_NUM_THREADS", "SLURM_CPUS_ON_NODE", "CPUS_PER_NODE", "SIGNAL_LEAD_S", "SLURM_GPUS_PER_NODE",
                 "SLURM_JOB_CPUS_PER_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_NTASKS_PER_NODE",
                 *(() if gpus else ("SLURM_GPUS_ON_NODE",))):
        if name not in extra:
            env.pop(name, None)
    return check(subprocess.run(["bash", str(SCRIPT), "configs/train/clause_tos.yaml", "train.lr=3e-5"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)).stdout


@pytest.mark.parametrize("nodes,nodelist,gpus,world", [(1, "gpu7", "8", 8), (2, "gpu[3-4]", "8", 16), (4, "n[1-4]", None, 4),
                                                     (1, "gpu7", "0", 1)])
def test_template_arithmetic_for_1_2_and_4_nodes(cluster, nodes, nodelist, gpus, world):
    out = render(cluster, nodes, nodelist, gpus)
    line = next(x for x in out.splitlines() if " srun " in x)
    head = {"gpu7": "gpu7", "gpu[3-4]": "gpu3", "n[1-4]": "n1"}[nodelist]
    assert f"--num_machines {nodes} --num_processes {world} " in line
    assert f"--main_process_ip {head} --main_process_port 24242" in line  # 20000 + 4242
    # Escaped: expands on each node inside srun, not in the batch script (where it is always 0).
    assert "--machine_rank $SLURM_NODEID" in line and "--machine_rank 0" not in line
    assert "-m launcher train configs/train/clause_tos.yaml train.lr=3e-5" in line  # launcher names the run
    assert f" srun --kill-on-bad-exit=1 --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --cpus-per-task=" in line
    assert (f"--gpus-per-task={gpus} " in line) == (gpus not in (None, "0"))  # what the job has on a node (tests below)
    assert ("--gpus-per-task=" in line) == (gpus not in (None, "0"))


@pytest.mark.parametrize("per_node, in_all, each", [("3", "", 3), ("a100:3", "", 3), ("a100:2,v100:1", "", 3), ("", "", 8),
                                                    ("a100:x", "", 8), ("", "8", 4), ("", "a100:6", 3), ("", "5", 8),
                                                    ("", "per task", 6), ("2", "per task", 2)])
def test_processes_per_node_follow_the_gpus_the_job_asked_for(cluster, per_node, in_all, each):
    """--gpus-per-node first, then --gpus-per-task x --ntasks-per-node, then --gpus over the nodes
    when it divides evenly, else the node's count (--exclusive makes SLURM_GPUS_ON_NODE the
    node's 8); typed counts as Slurm writes them."""
    per_task = {"SLURM_GPUS_PER_TASK": "a100:2", "SLURM_NTASKS_PER_NODE": "3"} if in_all == "per task" else {}
    out = render(cluster, 2, "gpu[3-4]", "8", SLURM_GPUS_PER_NODE=per_node, SLURM_GPUS="" if per_task else in_all, **per_task)
    assert f"2 node(s) x {each} = {2 * each} process(es)" in out and f"--gpus-per-task={each} " in out


@pytest.mark.parametrize("extra,cpus,threads,lead", [
    ({"SLURM_CPUS_ON_NODE": "96"}, 96, 12, 600),                                    # the whole node, 8 ranks
    ({"SLURM_CPUS_ON_NODE": "96", "CPUS_PER_NODE": "32"}, 32, 4, 600),              # overridden
    ({"SLURM_CPUS_ON_NODE": "4", "SIGNAL_LEAD_S": "900"}, 4, 1, 900),               # fewer CPUs than ranks: 1 thread
    ({"SLURM_CPUS_ON_NODE": "96", "SLURM_JOB_CPUS_PER_NODE": "96(x2),48"}, 48, 6, 600),  # the fewest of the nodes
    ({"SLURM_CPUS_ON_NODE": "96", "SLURM_JOB_CPUS_PER_NODE": "64,96(x3)"}, 64, 8, 600),
    ({"SLURM_CPUS_ON_NODE": "96", "SLURM_JOB_CPUS_PER_NODE": "96(x2),?"}, 96, 12, 600),  # unreadable: the batch node's
])
def test_cpus_threads_and_warning_lead(cluster, extra, cpus, threads, lead):
    out = render(cluster, 1, "gpu7", "8", **extra)
    line = next(x for x in out.splitlines() if " srun " in x)
    assert f"--cpus-per-task={cpus} " in line
    assert f"launcher: {cpus} CPUs per node, {threads} threads per rank; stop warning {lead} s before the time limit" in out


def test_two_node_job_trains_to_completion(cluster, tmp_path, twelve_steps):
    job, proc = sbatch(cluster, tmp_path, *STEPS, wait=True)
    state = cluster.job_state(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert proc.returncode == 0 and state["JobState"] == "COMPLETED", log[-4000:]
    assert "2 node(s) x 1 = 2 process(es)" in log
    run = tmp_path / "clause_tiny"
    facts = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank-*.json"))]
    assert [(f["rank"], f["node_rank"], f["world_size"]) for f in facts] == [(0, 0, 2), (1, 1, 2)]
    assert all(f["torch_distributed"]["rank"] == f["rank"] for f in facts)
    assert (run / "checkpoints" / "step-000012" / "COMPLETE").is_file() and (run / "model" / "model.safetensors").is_file()
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.data.tags["slurm_job_id"] == job and mlrun.data.tags["num_nodes"] == "2"
    from safetensors.torch import load_file  # the weights of one process on the same config

    a, b = load_file(run / "model" / "model.safetensors"), load_file(twelve_steps[1] / "model" / "model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_preempted_job_checkpoints_requeues_onto_fewer_nodes_and_resumes_the_same_run(cluster, tmp_path, twelve_steps):
    """`sbatch --nodes 1-2`: the first attempt gets both nodes; while it checkpoints and stops,
    one node is drained, so the requeued job gets one. It resumes the 2-rank checkpoint on 1
    rank (a full DDP state), in the same MLflow run, to the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    # Rank 0 takes 10 s more in step 1 (the requeued attempt starts past it): the stop asked for
    # below, once it sleeps there, lands before the 12 steps end, however slow the signal's way
    # through Slurm (a stop before the first step is test_interrupt's).
    job, proc = sbatch(cluster, tmp_path, *STEPS, nodes="1-2", LAUNCHER_STALL="0:1:10")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "clause_tiny"
    deadline = time.time() + 600
    out_file = tmp_path / f"slurm-{job}.out"
    while len(list((run / "ranks").glob("rank-*.json"))) < 2 or "LAUNCHER_STALL: rank 0 sleeps" not in (
            out_file.read_text() if out_file.is_file() else ""):  # both ranks are up (2 nodes) and train
        assert time.time() < deadline and cluster.job_state(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    drain = ["scontrol", "update", "nodename=n2"]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=30)
    subprocess.run([*drain, "state=drain", "reason=shrink"], env=cluster.env, check=True, timeout=30)
    try:
        # The job requeues itself and Slurm starts it again after AuthInfo=cred_expire (10 s here,
        # 120 s by default). Forcing an earlier start (scontrol update StartTime=now) races the
        # revoked credential of the first attempt: "Killing non-startable batch job: Job credential
        # revoked", exit 1, and no output (seen here in 1 run of 3).
        state = cluster.wait_job(job)
    finally:
        subprocess.run([*drain, "state=resume"], env=cluster.env, timeout=30)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and int(state.get("Restarts", 0)) >= 1, ({k: state.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "BatchHost")}, log[-4000:])
    stopped = [x for x in log.splitlines() if x.startswith("stopped at step")]
    assert len(stopped) == 1, log[-4000:]
    step = int(stopped[0].split()[3])
    assert "requeueing job" in log and f"resuming from {run / 'checkpoints' / f'step-{step:06d}'}" in log
    assert "2 node(s) x 1 = 2 process(es)" in log and "1 node(s) x 1 = 1 process(es)" in log, log[-4000:]
    (mlrun,) = all_runs(mlflow_client(tmp_path))  # the requeued job continued the same MLflow run
    assert mlrun.data.tags["launcher.attempts"] == "2"
    assert mlrun.data.params[f"resumed_at_{step}.world_size"] == "2 -> 1"
    client = mlflow_client(tmp_path)
    assert [m.step for m in sorted(client.get_metric_history(mlrun.info.run_id, "train/loss"), key=lambda m: m.step)] == list(range(1, 13))
    a, b = load_file(run / "model" / "model.safetensors"), load_file(twelve_steps[1] / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_a_sigterm_that_reaches_srun_kills_the_ranks_at_once(cluster, tmp_path):
    """A fact of Slurm (22.05 here) the README's grace rests on: srun answers a SIGTERM of its own
    by SIGKILLing the step's tasks ("srun: forcing job termination"), whatever grace the ranks
    would have. A time limit, `scancel --full` and a preemption that signals the batch step
    signal srun too, so under slurm/train.sh the grace that counts is the stop file's (the
    script's timer, `--signal=B:USR1`, `scancel --signal=USR1 --batch`): the ranks stop first."""
    job, proc = sbatch(cluster, tmp_path, *STEPS, nodes="2", LAUNCHER_STALL="0:2:30")
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / f"slurm-{job}.out"
    deadline = time.time() + 600
    while not log.is_file() or "LAUNCHER_STALL: rank 0 sleeps" not in log.read_text():  # in step 2 for 30 s
        assert time.time() < deadline and cluster.job_state(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--full", "--signal=TERM", job], env=cluster.env, check=True, timeout=30)
    state = cluster.wait_job(job, timeout=300)
    text = log.read_text()
    assert state["JobState"] == "FAILED" and "srun: forcing job termination" in text, (state, text[-3000:])
    assert "stopped at step" not in text and not (tmp_path / "clause_tiny" / "checkpoints" / "step-000002").exists()


def test_whole_nodes_by_default_and_oversubscribe_on_the_command_line_undoes_it(cluster):
    """The header's --exclusive (the node's CPUs for our ranks) yields to `sbatch --oversubscribe`
    where whole nodes cannot be had (Slurm 22.05: command-line options beat #SBATCH lines)."""
    seen = {}
    for extra in ([], ["--oversubscribe", "--cpus-per-task", "1"]):
        proc = subprocess.run(["sbatch", "--parsable", "--hold", *extra, str(SCRIPT), str(TINY)], env=cluster.env,
                              capture_output=True, text=True, timeout=60)
        job = proc.stdout.strip().split(";")[0]
        assert job, proc.stderr
        info = subprocess.run(["scontrol", "show", "job", job], env=cluster.env, capture_output=True, text=True).stdout
        subprocess.run(["scancel", job], env=cluster.env, timeout=60)
        seen[bool(extra)] = next(x for x in info.split() if x.startswith("OverSubscribe="))
    assert seen == {False: "OverSubscribe=NO", True: "OverSubscribe=YES"}


def _stubbed(tmp_path: Path, squeue: str, python: str, requeue_fails: bool = False, **env: str) -> subprocess.CompletedProcess:
    """slurm/train.sh as a batch job runs it, with Slurm's commands and the interpreter replaced
    by scripts: `squeue` prints `squeue` (or fails when empty), `srun` runs the node's command
    in place, `scontrol` records a requeue, and PYTHON is `python` (a shell script)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "squeue": f"#!/bin/bash\n{'echo ' + squeue if squeue else 'exit 1'}\n",
        "srun": '#!/bin/bash\nwhile [ "$1" != bash ]; do shift; done\nexec "$@"\n',
        "scontrol": f'#!/bin/bash\nif [ "$1" = requeue ]; then echo requeued >> {tmp_path}/requeued; '
                    f'{"exit 1; " if requeue_fails else ""}else echo n1; fi\n',
        "python": python,
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1", "SLURM_NODEID": "0",
            "PYTHON": str(bin_dir / "python"), "OUTPUT_DIR": str(tmp_path / "out"), "HOME": str(tmp_path), "TZ": "UTC", **env}
    return subprocess.run(["bash", str(SCRIPT), "configs/train/clause_tos.yaml"], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=60)


# The node's command: train for 2 s and say whether the stop file was there at the end; a stop
# is acknowledged beside it, as launcher does (preemption.acknowledge).
TRAINS_2S = ('#!/bin/bash\nsleep 2\nif [ -e "$LAUNCHER_STOP_FILE" ]; then echo "stopped early"; '
             'touch "$LAUNCHER_STOP_FILE.stopped"; else echo "trained"; fi\n')


@pytest.mark.parametrize("squeue", ["", "N/A", "1:05:00"], ids=["squeue-fails", "unlimited", "relative-format"])
def test_an_end_time_that_cannot_be_read_leaves_the_timer_off(tmp_path, squeue):
    """squeue failing (a busy controller) or printing what date cannot read: `date -d ""` is
    today's midnight, so the script's timer fired at once and every job stopped after its first
    step and requeued itself. Now the timer is off and Slurm's --signal stays the warning."""
    proc = _stubbed(tmp_path, squeue, TRAINS_2S)
    assert proc.returncode == 0, proc.stderr
    assert "trained" in proc.stdout and "caught SIG" not in proc.stdout
    assert not (tmp_path / "requeued").exists()


def test_a_time_limit_shorter_than_twice_the_lead_is_said_and_the_stop_requeues(tmp_path):
    """A debug partition's 10 minutes with the 600 s lead: the stop comes at once. One line says
    so; the stop still checkpoints and requeues (the run goes on, a few steps per attempt)."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)  # the script's date reads it in TZ=UTC
    end = (now + datetime.timedelta(seconds=300)).strftime("%Y-%m-%dT%H:%M:%S")
    proc = _stubbed(tmp_path, end, TRAINS_2S)
    assert proc.returncode == 0, proc.stderr
    assert "leave less training than SIGNAL_LEAD_S (600 s)" in proc.stderr
    assert "stopped early" in proc.stdout and (tmp_path / "requeued").read_text() == "requeued\n"


def test_a_time_limit_warning_before_the_first_step_is_said_and_not_requeued(tmp_path):
    """A run stops before its first step when the stop comes during start-up (no checkpoint, the
    run directory marked to start again in place). When this script's own timer asked, every
    requeued attempt would get the same time and start up as long: requeued, the job would go
    round for ever without a step. A stop asked from outside still requeues (a preemption)."""
    import datetime

    before_step = ('#!/bin/bash\nsleep 2\nif [ -e "$LAUNCHER_STOP_FILE" ]; then echo "stopped before the first step"; '
                   'echo "stop file $LAUNCHER_STOP_FILE before the first step" > "$LAUNCHER_STOP_FILE.stopped"; fi\n')
    now = datetime.datetime.now(datetime.timezone.utc)
    end = (now + datetime.timedelta(seconds=300)).strftime("%Y-%m-%dT%H:%M:%S")  # the timer fires at once
    proc = _stubbed(tmp_path, end, before_step)
    assert proc.returncode == 1 and not (tmp_path / "requeued").exists(), (proc.stdout, proc.stderr)
    assert "launcher: the time-limit warning (SIGNAL_LEAD_S=600 s before the limit) came before the first step" \
        in proc.stderr
    assert not list((tmp_path / "out").glob(".launcher-stop-*"))  # its stop directory is cleaned up as always


def test_a_job_that_cannot_requeue_itself_says_how_to_resume(tmp_path):
    """Submitted with --no-requeue, `scontrol requeue` fails: under set -e the job ended right after
    "requeueing ..." with scontrol's status and nothing said."""
    stopped = '#!/bin/bash\necho "SIGTERM" > "$LAUNCHER_STOP_FILE.stopped"\n'  # a stop asked from outside
    proc = _stubbed(tmp_path, "", stopped, requeue_fails=True)
    assert (tmp_path / "requeued").exists() and proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.splitlines()[-1] == ("launcher: the job cannot requeue itself (submitted with --no-requeue?); "
                                            "submit the same command again to go on (from the checkpoint just written, or from step 0 in "
                                            "place)"), proc.stderr


@pytest.mark.parametrize("left_s, requeued", [(660, False), (3600, True)])
def test_slurms_own_warning_before_the_timer_is_the_time_limit_warning_too(tmp_path, left_s, requeued):
    """Slurm's --signal=B:USR1@600 may come before this script's timer (up to a minute early, or
    at 600 s where SIGNAL_LEAD_S is lower): a stop before the first step was then requeued, and
    every attempt went round the same way for ever. The time left decides now: near the limit
    it is not requeued; a stop asked an hour before the limit (a preemption) still is."""
    import datetime

    warned_first = ('#!/bin/bash\nkill -USR1 $PPID\nsleep 2\nif [ -e "$LAUNCHER_STOP_FILE" ]; then '
                    'echo "stop file $LAUNCHER_STOP_FILE before the first step" > "$LAUNCHER_STOP_FILE.stopped"; fi\n')
    end = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=left_s)).strftime("%Y-%m-%dT%H:%M:%S")
    proc = _stubbed(tmp_path, end, warned_first)  # the timer waits left_s - 600 s: it has not fired
    # Named as what it is (it said "the time-limit warning" for an hour-early USR1 or a SIGTERM too).
    said = "caught SIGUSR1 (a stop request)" if requeued else "caught SIGUSR1 (the time-limit warning)"
    assert said in proc.stdout and "s to the time limit" not in proc.stdout, proc.stdout
    assert (tmp_path / "requeued").exists() == requeued and proc.returncode == (0 if requeued else 1), (proc.stdout, proc.stderr)


def test_the_interpreter_and_accelerate_config_reach_the_node_as_given(tmp_path):
    """PYTHON and ACCELERATE_CONFIG went into the node's command in plain double quotes: a $ or a
    backquote in a path ran on the node (`id` did), a double quote broke the command."""
    odd = tmp_path / 'x $HOME `id` "q" y'
    odd.mkdir()
    (odd / "python").write_text('#!/bin/bash\necho "ARG0:$0"\nprintf "ARG:%s\\n" "$@"\n')
    (odd / "python").chmod(0o755)
    (odd / "a.yaml").write_text("")
    proc = _stubbed(tmp_path, "", "#!/bin/bash\n", ACCELERATE_CONFIG=str(odd / "a.yaml"), PYTHON=str(odd / "python"))
    args = [line.removeprefix("ARG:") for line in proc.stdout.splitlines() if line.startswith("ARG:")]
    assert proc.returncode == 0 and f"ARG0:{odd / 'python'}" in proc.stdout.splitlines(), (proc.stdout, proc.stderr)
    assert args[args.index("--config_file") + 1] == str(odd / "a.yaml"), (proc.stdout, proc.stderr)


def test_a_usr1_sent_to_the_job_step_does_not_kill_the_node_launcher(tmp_path):
    """`scancel --signal=USR1 JOB` (without --batch) signals every process of the step.
    accelerate/torchrun have no handler for SIGUSR1, so its default action killed the node's
    launcher and Slurm then killed the ranks mid-step. The step now runs with USR1 ignored; the
    ranks install their own handler (python can; launcher.preemption does)."""
    python = '#!/bin/bash\nkill -USR1 $$\necho "launcher still running"\n'
    proc = _stubbed(tmp_path, "", python)
    assert proc.returncode == 0 and "launcher still running" in proc.stdout, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("env, name", [({}, None), ({"RUN_NAME": "sweep-a"}, "sweep-a")])
def test_the_run_name_is_launchers_own_unless_run_name_is_set(tmp_path, env, name):
    """The script passed --run-name <config stem> always, overriding the config's run_name and a
    run_name=... override: a sweep's jobs all wrote into one run directory."""
    python = '#!/bin/bash\necho "ARGS: $*"\n'
    proc = _stubbed(tmp_path, "", python, **env)
    (args,) = [line for line in proc.stdout.splitlines() if line.startswith("ARGS: ")]
    assert args.endswith("-m launcher train configs/train/clause_tos.yaml" + (f" --run-name {name}" if name else "")
                         + f" --output-dir {tmp_path / 'out'}"), args


def test_a_warning_the_run_did_not_stop_for_requeues_nothing(tmp_path):
    """A stop warning that came after the last step (the final evaluation or the export) left a
    finished run, and the script requeued it all the same: a job slot spent to say "already
    finished". It requeues now only when launcher says the run stopped early."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    end = (now + datetime.timedelta(seconds=300)).strftime("%Y-%m-%dT%H:%M:%S")
    finishes = '#!/bin/bash\nsleep 2\necho "finished"\n'  # ignores the stop file: its last step was done
    proc = _stubbed(tmp_path, end, finishes)
    assert proc.returncode == 0, proc.stderr
    assert "caught SIGUSR1 (the time-limit warning)" in proc.stdout and "nothing to requeue" in proc.stdout
    assert not (tmp_path / "requeued").exists()


def test_a_stop_file_that_cannot_be_created_is_a_warning_and_the_job_waits_for_its_ranks(tmp_path):
    """The warning's trap ran under `set -e`: a touch that failed (a full or stale shared file
    system; here a directory that does not exist) ended the batch script with srun still
    running, so Slurm killed the ranks mid-step. The trap now warns and the script waits."""
    signals_the_script = '#!/bin/bash\nkill -USR1 $PPID\nsleep 1\necho "trained"\n'  # srun's stub execs it: $PPID is the script
    proc = _stubbed(tmp_path, "", signals_the_script, LAUNCHER_STOP_FILE=str(tmp_path / "no-such-dir" / "stop"))
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    # No end time: Slurm's --signal is the warning then, or it was sent by hand
    assert "caught SIGUSR1 (the time-limit warning, or a stop request)" in proc.stdout and "trained" in proc.stdout
    assert f"launcher: warning: cannot create the stop file {tmp_path / 'no-such-dir' / 'stop'}; the ranks were not asked to stop" in proc.stderr


def test_a_sigterm_to_the_batch_script_is_named_as_such(tmp_path):
    """`scancel --signal=TERM --batch JOB` (or a preemption's SIGTERM) was reported as "the
    time-limit warning"; the line names the signal and calls it a stop request."""
    signals_the_script = '#!/bin/bash\nkill -TERM $PPID\nsleep 1\necho "trained"\n'
    proc = _stubbed(tmp_path, "", signals_the_script)
    assert proc.returncode == 0 and "launcher: caught SIGTERM (a stop request); asking every rank to checkpoint and stop" \
        in proc.stdout.splitlines(), (proc.stdout, proc.stderr)


@pytest.mark.parametrize("why", ["SIGUSR1", "SIGTERM"])
def test_ranks_stopped_by_a_signal_sent_to_them_requeue_the_job(tmp_path, why):
    """`scancel --signal=USR1 JOB` (without --batch) reaches the ranks, not the batch script: they
    checkpoint, exit 0 and say they stopped early, and the script, which saw no warning itself,
    ended the job as finished with the run half done. The ranks' word now decides, whatever
    signal it was (a preemption may signal only the steps), and the requeue line names it."""
    stopped = f'#!/bin/bash\necho "stopped early"\necho {why} > "$LAUNCHER_STOP_FILE.stopped"\n'
    (tmp_path / why).mkdir()
    proc = _stubbed(tmp_path / why, "", stopped)
    assert proc.returncode == 0, proc.stderr
    assert "caught SIG" not in proc.stdout
    assert f"the run stopped early ({why}): requeueing job 77" in proc.stdout, proc.stdout
    assert (tmp_path / why / "requeued").read_text() == "requeued\n"


@pytest.mark.parametrize("env, said", [
    ({"GPUS_PER_NODE": "eight"}, "error: GPUS_PER_NODE: expected a whole number; got 'eight'"),
    ({"SIGNAL_LEAD_S": "10m"}, "error: SIGNAL_LEAD_S: expected a whole number; got '10m'"),
    ({"CPUS_PER_NODE": "08"}, "error: CPUS_PER_NODE: expected a whole number; got '08'"),
    ({"GPUS_PER_NODE": "0"}, "error: GPUS_PER_NODE: must be 1 or more; got 0"),
    ({"MAIN_PORT": "70000"}, "error: MAIN_PORT: expected a port in 1..65535; got 70000"),
    ({"ACCELERATE_CONFIG": "configs/accelerate/no_such.yaml"},  # (the node's launch named it --accelerate-config)
     f"error: ACCELERATE_CONFIG: no such file: configs/accelerate/no_such.yaml (relative to {ROOT}, where the job starts)"),
    ({"ACCELERATE_CONFIG": "/no/such.yaml"}, "error: ACCELERATE_CONFIG: no such file: /no/such.yaml"),
    ({"GPUS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "4"},  # (two ranks shared each GPU, without a word)
     "error: GPUS_PER_NODE: 8 ranks per node, but the job has 4 GPU(s) per node; ask for more GPUs or lower GPUS_PER_NODE"),
])
def test_a_count_in_the_environment_that_is_no_whole_number_is_one_line_before_anything_starts(tmp_path, env, said):
    """GPUS_PER_NODE=eight printed a bash error and ran one process per node; SIGNAL_LEAD_S=10m
    ended the script under `set -u` with "unbound variable"; 08 was bash's octal error."""
    proc = _stubbed(tmp_path, "", '#!/bin/bash\necho "launched"\n', **env)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [said], (proc.returncode, proc.stderr)
    assert "launched" not in proc.stdout and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gpu_cluster(cluster, tmp_path_factory):
    """A second two-node cluster beside the first (ports of its own) whose nodes have 4 GPUs
    each (device files stand in for them; slurm_cluster.Cluster), and n2 half n1's CPUs."""
    from slurm_cluster import Cluster

    first = os.environ["SLURM_CONF"]
    c = Cluster(tmp_path_factory.mktemp("slurm-gpus"), gpus=4, ports=10, fewer_cpus_on_n2=True).start()
    try:
        yield c
    finally:
        c.stop()
        os.environ["SLURM_CONF"] = first


@pytest.mark.parametrize("ask, gpus", [(["--gpus-per-node=4"], 4), (["--gpus-per-task=1", "--ntasks-per-node=4"], 4),
                                       (["--gpus-per-task=1", "--ntasks-per-node=4", "--gpu-bind=single:1"], 4),
                                       (["--ntasks-per-gpu=1", "--gpus-per-node=4"], 4), (["--gpus-per-node=3"], 3),
                                       (["--gpus=4"], 2), (["--gpus-per-task=1", "--ntasks-per-node=2"], 2),
                                       (["--gres=gpu:3"], 4)],
                         ids=["per-node", "per-task", "per-task-bound", "tasks-per-gpu", "part-of-the-node", "in-all",
                              "per-task-part", "gres"])
def test_each_nodes_launch_gets_every_gpu_and_the_fewest_cpus_the_job_has_on_a_node(gpu_cluster, tmp_path, ask, gpus):
    """A job asked for per task (the usual `--gpus-per-task=1 --ntasks-per-node=4` of a torchrun
    script) handed srun SLURM_GPUS_PER_TASK=1: our one task per node saw 1 of its 4 GPUs, under a
    launch of 4 processes. `--ntasks-per-gpu` made srun refuse our --ntasks-per-node. 3 of a
    node's 4 GPUs (or 4 over 2 nodes): --exclusive made SLURM_GPUS_ON_NODE 4, so 4 ranks shared
    the step's 3 (2) GPUs. `--gres=gpu:3` under the header's --exclusive: the job is given the
    node's every GPU (SLURM_JOB_GPUS and the step's CUDA_VISIBLE_DEVICES list all 4; Slurm 22.05),
    so 4 ranks per node is what it has."""
    python = tmp_path / "python"  # the node's launch: what it was given and what Slurm gave its step
    python.write_text('#!/bin/bash\necho "gpus=$CUDA_VISIBLE_DEVICES $*" > "$OUTPUT_DIR/node-$SLURM_NODEID"\n')
    python.chmod(0o755)
    proc = subprocess.run(["sbatch", "--wait", "--nodes", "2", *ask, "--output", str(tmp_path / "slurm.out"), str(SCRIPT), str(TINY)],
                          cwd=ROOT, env={**gpu_cluster.env, "PYTHON": str(python), "OUTPUT_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "slurm.out").read_text() if (tmp_path / "slurm.out").is_file() else proc.stderr
    assert proc.returncode == 0, log
    assert f"2 node(s) x {gpus} = {2 * gpus} process(es)" in log
    # n2 has half n1's CPUs: the batch script on n1 gave each node's task n1's count, which n2
    # refused ("More processors requested than permitted")
    assert f"launcher: {gpu_cluster.cpus // 2} CPUs per node" in log
    for node in (0, 1):
        seen = (tmp_path / f"node-{node}").read_text()
        visible = ",".join(str(i) for i in range(gpus))  # (Slurm's indices within the node)
        assert seen.startswith(f"gpus={visible} ") and f"--num_machines 2 --num_processes {2 * gpus} --machine_rank {node}" in seen, seen


def test_the_dry_run_line_reads_back_as_it_would_run(cluster):
    """The dry run printed the node's command in '...': an argument with a quote in it (%q writes
    o\\'brien) made a line that no shell reads back as the command."""
    import shlex

    for name in ("plain", "o'brien"):
        line = next(x for x in render(cluster, 1, "gpu7", "8", RUN_NAME=name).splitlines() if " srun " in x)
        words = shlex.split(line)
        command = shlex.split(words[words.index("-c") + 1])
        assert command[-4:] == ["configs/train/clause_tos.yaml", "--run-name", name, "train.lr=3e-5"], command
