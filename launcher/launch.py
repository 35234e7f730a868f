"""`accelerate launch`, as `launcher train --accelerate-config` runs it, with Ctrl-C as a stop.

torchrun (the engine under `accelerate launch`) turns a SIGINT into an exception: it forwards
the signal to the ranks, waits for them, then re-raises it, so a stop that went well still ends
in its traceback; and a second Ctrl-C reaches the ranks as a SIGTERM, which they take as the
stop they are already making. So torchrun is told to leave SIGINT alone (its
--signals-to-handle, which it exports as TORCHELASTIC_SIGNALS_TO_HANDLE) and this process forwards
each Ctrl-C to the ranks itself: the first asks them to checkpoint at the end of the step and
exit (runtime.watch_signals); the second makes them exit at once, and this process then exits
130 with their one line instead of torchrun's failure report. SIGTERM is forwarded here too,
with torchrun's grace: the ranks are SIGKILLed TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later
(preemption.py). torchrun's own handling forwarded it as well, but then exited 143 (accelerate
turns its SignalException into 128 + N) after ranks that had checkpointed and exited 0: a
clean stop read as a failure, which slurm/train.sh does not requeue. Now the launch ends as
its ranks did.

A one-process config (cpu.yaml, single_gpu.yaml) does not go through torchrun: accelerate's
simple launcher SIGKILLed its process 5 s after a SIGTERM, mid-checkpoint (accelerate 1.16,
commands/launch.py). That launcher is replaced here by one that forwards the SIGTERM and
gives the process the same TORCH_ELASTIC_SHUTDOWN_TIMEOUT as torchrun's ranks get.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

HANDLED_BY_TORCHRUN = "SIGHUP,SIGQUIT"  # torch's default list, less SIGINT and SIGTERM (ours, below)


def _grace_s() -> float:
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT, as torchrun reads it."""
    from launcher import preemption

    try:
        return float(os.environ.get(preemption.ENV) or preemption.TORCH_DEFAULT_S)
    except ValueError:
        return float(preemption.TORCH_DEFAULT_S)


def _stop_children(grace: float) -> None:
    """After a SIGTERM, what torchrun does for its ranks (a daemon thread): each child gets the
    SIGTERM once, those started after it too (the signal may come while accelerate runs a
    helper such as nvidia-smi, before torchrun starts the ranks), and `grace` seconds later
    every descendant still alive is SIGKILLed."""
    import threading

    import psutil

    def watch():
        told: set[int] = set()
        end = time.monotonic() + grace
        while time.monotonic() < end:
            for child in psutil.Process().children():
                if child.pid not in told:
                    told.add(child.pid)
                    try:
                        child.send_signal(signal.SIGTERM)
                    except psutil.Error:
                        pass
            time.sleep(0.25)
        for process in psutil.Process().children(recursive=True):
            try:
                process.kill()
            except psutil.Error:
                pass

    threading.Thread(target=watch, name="sigterm-grace", daemon=True).start()


def _send(children, signum: int) -> None:
    import psutil

    for child in children:
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass


class _Forwarder:
    """The launch's signal handlers: what they were asked, and the one line that says so."""

    def __init__(self):
        self.pressed: list[int] = []
        self.terminated: list[float] = []
        self.handled = 0  # signals these handlers have run for (_exit_when_stuck compares)

    def sigint(self, signum, _frame):
        import psutil

        self.handled += 1
        self.pressed.append(signum)
        if not psutil.Process().children():  # no rank to stop at a step end (it was swallowed)
            print("launcher: interrupted (Ctrl-C) while no rank was running", file=sys.stderr, flush=True)
            os._exit(130)
        # Every child: torchrun's ranks run in sessions of their own, out of the terminal's
        # reach. A one-process config's rank shares the terminal's group and gets a typed
        # Ctrl-C twice, within milliseconds: one press to it (runtime.SAME_KEY_PRESS_S).
        _send(psutil.Process().children(), signal.SIGINT)

    def sigterm(self, signum, _frame):
        import psutil

        self.handled += 1
        children = psutil.Process().children()
        if not children:  # nothing started yet: nothing to stop cleanly, the default action
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        elif not self.terminated:
            self.terminated.append(time.monotonic())
            _stop_children(_grace_s())
        else:  # again: to every rank again, as torchrun forwards each (they are already stopping)
            _send(children, signal.SIGTERM)

    def failed_exit(self) -> None:
        """Ranks failed: exit in one line when a signal of ours explains it (else the caller raises)."""
        if len(self.pressed) >= 2:  # the ranks exited at once, as the second Ctrl-C asked; they said so
            sys.exit(130)
        if self.terminated:  # what happened, not torchrun's report of ranks that died of it
            grace = _grace_s()
            if time.monotonic() - self.terminated[0] >= grace:
                print(f"launcher: the ranks were still running {grace:.0f} s after the SIGTERM "
                      "(TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and were killed", file=sys.stderr, flush=True)
            else:
                print("launcher: the SIGTERM ended ranks that were starting, before they could stop at a step",
                      file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGTERM)


def _exit_when_stuck(signals: _Forwarder) -> None:
    """Ctrl-C or a SIGTERM while torchrun waits in its rendezvous for the other machines: that
    wait is C++ holding the main thread, so the Python handlers above never ran and the launch
    ignored both until the rendezvous timed out (many minutes). The C-level handler still writes
    each signal's number to the wakeup socket at once; this thread reads it, and when a moment
    later the handlers have not run for it, the main thread is still in the rendezvous and no
    rank has started (nothing to checkpoint), ends the launch with one line."""
    import threading

    import psutil

    from launcher import preemption

    main_id = threading.main_thread().ident
    received: list[int] = []

    def in_rendezvous() -> bool:
        frame = sys._current_frames().get(main_id)  # type: ignore[arg-type]
        while frame is not None:
            if frame.f_code.co_name == "_rendezvous" and "elastic" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def arrived(data: bytes) -> None:
        ours = [n for n in data if n in (signal.SIGINT, signal.SIGTERM)]
        received.extend(ours)
        if not ours:
            return
        time.sleep(STUCK_S)
        if signals.handled < len(received) and in_rendezvous() and not psutil.Process().children():
            print(f"launcher: {'interrupted (Ctrl-C)' if ours[-1] == signal.SIGINT else 'terminated (SIGTERM)'} "
                  "while waiting for the other machines to join; no rank had started", file=sys.stderr, flush=True)
            os._exit(128 + ours[-1])

    preemption.watch_arrivals(arrived, "stuck-signals")


STUCK_S = 2.0  # a handler that can run has run by then


def main() -> None:
    import psutil  # noqa: F401 - an accelerate dependency, imported before any handler needs it

    signals = _Forwarder()
    signal.signal(signal.SIGINT, signals.sigint)
    # SIGUSR1 asks the ranks to stop at a step's end (launcher.preemption installs their handler);
    # here its default action ended the launch, and with it every rank mid-step, when it came to
    # every process of a Slurm step (`scancel --signal=USR1 JOB`, `#SBATCH --signal=USR1@600`) of
    # a user's own srun script. slurm/train.sh ignored it for the launch already (trap "" USR1).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _exit_when_stuck(signals)
    import accelerate.commands.launch as accelerate_launch
    from accelerate.commands.launch import launch_command, launch_command_parser

    accelerate_launch.simple_launcher = _one_process
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:])
    if args.config_file:  # slurm/train.sh comes here directly: the checks `launcher train --accelerate-config` makes
        _refuse_bad_launch(args.config_file, args.num_processes, args.num_machines)
        _refuse_bad_run(args)
    # torchrun's --signals-to-handle (accelerate hands torchrun every argument it knows by name)
    args.signals_to_handle = HANDLED_BY_TORCHRUN
    signal.signal(signal.SIGTERM, signals.sigterm)  # (a one-process launch installs its own: _one_process)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_after_a_bad_input)
    try:
        launch_command(args)
    except ChildFailedError as failed:
        signals.failed_exit()
        # A bad input found once the ranks started: the first rank to fail said it in one line
        # (cli._report), and torchrun SIGTERMed the others, which wait for that.
        if failed.failures and failed.get_first_failure()[1].exitcode == 2 and \
                all(f.exitcode in (2, -signal.SIGTERM) for f in failed.failures.values()):
            sys.exit(2)
        raise
    except subprocess.CalledProcessError as failed:  # one process: its own error line is printed already
        code = failed.returncode
        sys.exit(130 if len(signals.pressed) >= 2 else code if code > 0 else 128 - code)  # killed by signal N: 128 + N


def _after_a_bad_input(record: logging.LogRecord) -> bool:
    """torchrun's log lines that are noise after a rank's one `error:` line (exit 2: a bad input
    found once the ranks had started, such as a restart that another config refuses): its line
    for the rank's exit code 2, and, after any failure, its line for the SIGTERM it sends the
    ranks still running. After a crash (exit 1) the exit-code line stays, with the rank's
    traceback and torchrun's report."""
    message = str(record.msg)
    if message.startswith("Sending process") and "closing signal" in message:
        return False
    return not (message.startswith("failed (exitcode:") and bool(record.args) and record.args[0] == 2)  # type: ignore[index]


def _refuse_bad_launch(config_file: str, num_processes: int | None, num_machines: int | None) -> None:
    """Exit 2 with one line per problem of the accelerate config and counts (distributed.from_yaml):
    a config that would start one whole training per machine is refused before any starts."""
    from launcher import distributed
    from launcher.errors import UserError

    try:
        problems = distributed.from_yaml(config_file, num_processes, num_machines).problems
    except UserError as e:
        problems = e.problems
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(2)


def _refuse_bad_run(args) -> None:
    """The run config's checks against this launch (`launcher train --accelerate-config`'s), once
    here before any rank starts: under slurm/train.sh a batch the world size does not divide was
    refused by every rank, one line each, 16 for 2 nodes x 8 GPUs. Skipped when `launcher train
    --accelerate-config` made them already, and for a script other than `launcher train`."""
    from launcher import cli, distributed
    from launcher.errors import UserError

    script = args.training_script_args or []
    if os.environ.pop(cli.RUN_CHECKED, None) or not (args.module and args.training_script == "launcher"
                                                     and script[:1] == ["train"]):
        return
    try:
        cli.check_run(cli.parse(script), distributed.from_yaml(args.config_file, args.num_processes, args.num_machines))
    except UserError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def _one_process(args) -> None:
    """accelerate's simple launcher with torchrun's grace: the process gets a SIGTERM forwarded
    and TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds to checkpoint before it is killed."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    import psutil

    cmd, env = prepare_simple_launcher_cmd_env(args)
    grace = _grace_s()
    asked: list[float] = []
    running: list[subprocess.Popen] = []

    def term(signum, _frame):  # installed before the start: a SIGTERM then is sent on at once
        asked.append(time.monotonic())
        for child in running:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, term)
    child = subprocess.Popen(cmd, env=env)
    running.append(child)
    if asked:
        child.send_signal(signal.SIGTERM)
    while True:
        try:
            code = child.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if asked and time.monotonic() - asked[0] > grace:  # the process and what it started
                for process in [*psutil.Process(child.pid).children(recursive=True), psutil.Process(child.pid)]:
                    try:
                        process.kill()
                    except psutil.Error:
                        pass
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


if __name__ == "__main__":
    main()
