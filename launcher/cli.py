"""`launcher` command line: train, eval, predict, generate, plan, export, env, synth. Exit codes: 0 ok, 2 bad config/input."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

from launcher import __version__
from launcher.data.sources import BadRows, ShortRow
from launcher.errors import RunError, UserError
from launcher.files import file_in_the_way



REMOTE_CODE_HELP = ("load a model whose config or tokenizer config names Python files shipped with it "
                    "(auto_map): loading runs them")


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a batch size, a length, a token count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port (a traceback deep in the rendezvous otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535; got {text!r}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**32), as data.synthetic.seed and train.seed take."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32); got {text!r}")
    return value


PRECISIONS = ("no", "bf16", "fp16")
PRECISION_HELP = ("no (the default): the export's weights as saved (its checkpoint.export_dtype: float32, "
                  "bfloat16 or float16), no autocast; "
                  "bf16 / fp16: under that autocast, as a run with train.precision=bf16 / fp16 evaluated the model "
                  "(fp16 on a GPU)")


def _precision(args, model_dir: str, model, note: bool = False):
    """--precision as a context: none (the weights as saved), or autocast in 16 bits as a train.precision=bf16 run
    evaluated. The same weights can score far apart in the two: SmolLM2 after two LoRA steps,
    the end-of-turn token's loss 0.85 in float32 against 3.3 under bf16, so `note` says so
    where the run's own figures came from the other."""
    import contextlib

    import torch

    device = next(model.parameters()).device.type
    if args.precision == "fp16" and device != "cuda":  # (before the note, which spoke of figures never made)
        raise UserError("--precision: fp16 needs a GPU (bf16 runs on a CPU)")
    from launcher.models import export_meta

    meta = export_meta(model_dir)
    trained = meta.get("precision")
    if note and isinstance(trained, str) and trained != args.precision:
        def kind(precision: str) -> str:
            return (f"{precision} autocast" if precision != "no" else
                    f"{meta.get('export_dtype') or 'float32'} weights without autocast")

        print(f"note: the run evaluated this model under {kind(trained) if trained != 'no' else 'float32'}; these "
              f"figures are from {kind(args.precision)} (--precision {trained} evaluates as it did"
              f"{', on a GPU' if trained == 'fp16' else ''})", file=sys.stderr)
    if args.precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors in the house shape: one line and exit code 2. argparse prints
    its whole usage block (3 to 5 lines here) above the error; --help still shows it.
    Subcommand parsers are of this class too (add_subparsers makes them of the parent's)."""

    argv: list[str] = []  # what parse() was given (a subcommand's parser shares it)

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            # A misspelt flag (--inptu) was hidden behind the one it misses: said first.
            unknown = [a for a in _Parser.argv if a.startswith("--") and a.split("=")[0] not in self._option_string_actions]
            if unknown and self.prog != "launcher":
                message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launcher", description="Fine-tune transformers from a laptop to a Slurm cluster.")
    p.add_argument("--version", action="version", version=f"launcher {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a run config", description="Train from a run config. Launch under "
                       "`accelerate launch -m launcher train ...` for several processes.",
                       epilog="Resume: the same command again goes on from the run directory's newest checkpoint "
                       "(checkpoint.resume=auto), in the same tracker run; a run killed before its first checkpoint "
                       "starts again in place. A changed config is listed and recorded; a change that makes another "
                       "run (model, data, seed, global batch, optimisation) is refused unless "
                       "checkpoint.resume_changed=allow. checkpoint.resume=never refuses an existing run directory; "
                       "checkpoint.resume=PATH resumes from that checkpoint (another run's: a new run starts from it).")
    t.add_argument("config", help="run config YAML (e.g. configs/train/clause_tiny.yaml)")
    t.add_argument("--output-dir", help="parent of the run directory (config: output_dir)")
    t.add_argument("--run-name", help="run directory name (config: run_name; default: the config file's stem)")
    t.add_argument("--accelerate-config", metavar="F", help="validate the run config with this accelerate YAML (and "
                   "its DeepSpeed JSON) in this process, then become `accelerate launch --config_file F -m launcher "
                   "train ...` (do not run it under accelerate launch yourself)")
    t.add_argument("--num-processes", type=_count, metavar="N", help="with --accelerate-config: processes in all (all nodes)")
    t.add_argument("--nodes", type=_count, metavar="N", help="with --accelerate-config: number of machines")
    t.add_argument("--machine-rank", type=int, metavar="R", help="with --nodes: this machine's rank (0 = head)")
    t.add_argument("--main-process-ip", metavar="H", help="with --nodes: address of machine 0")
    t.add_argument("--main-process-port", type=_port, metavar="P", help="with --accelerate-config: rendezvous port")
    t.add_argument("overrides", nargs="*", default=[], metavar="key=value",  # default: not named as required
                   help="dotted config overrides, e.g. train.lr=3e-5")

    e = sub.add_parser("eval", help="metrics of an exported model on a labelled file (one JSON line)")
    e.add_argument("model_dir")
    e.add_argument("--data", required=True, help="classifier: JSONL/CSV/Parquet with text and label/labels; "
                   "causal LM: rows with references in the run's shape (its column mapping, instruction/output, "
                   "messages, prompt/completion or conversations)")
    e.add_argument("--max-length", type=_count, help="default: the training max_length the export recorded (else 512)")
    e.add_argument("--batch-size", type=_count, default=32)
    e.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    e.add_argument("--precision", choices=PRECISIONS, default="no", help=PRECISION_HELP)

    g = sub.add_parser("generate", help="greedy answer of an exported causal LM to one instruction")
    g.add_argument("model_dir")
    g.add_argument("--prompt", required=True, help="the instruction, or the value of data.prompt's one column; rendered as the run's training rows")
    g.add_argument("--max-new-tokens", type=_count, default=64)
    g.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    g.add_argument("--precision", choices=PRECISIONS, default="no", help=PRECISION_HELP)

    r = sub.add_parser("predict", help="predict labels for texts, or a causal LM's answers to rows (JSONL out)")
    r.add_argument("model_dir")
    r.add_argument("--input", required=True, help="classifier: plain text (one clause per line) or JSONL/CSV/Parquet "
                   "rows with a `text` field (or the column the run's data.text_column named); causal LM: JSONL/CSV/Parquet "
                   "rows with the columns the run's prompt needs, "
                   "or one prompt per line; - (or a pipe): plain lines from standard input")
    r.add_argument("--output", help="JSONL file to write, each input row with its prediction (label or labels, "
                   "probs; a gold label or labels column kept as input_label(s); a causal LM's response too; a plain-text line's number as line), written once all are answered "
                   "(default, or -: stdout)")
    r.add_argument("--max-length", type=_count, help="classifier: default the training max_length the export recorded "
                   "(else 512); causal LM: prompts are cut only at this, or where a learned position table "
                   "leaves the answer room (as generate's)")
    r.add_argument("--batch-size", type=_count, default=32)
    r.add_argument("--max-new-tokens", type=_count, help="causal LM: answer length limit (default: where the run's "
                   "evaluation answers stopped, 8 tokens past its longest reference, as launcher.json records)")
    r.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    r.add_argument("--precision", choices=PRECISIONS, default="no", help=PRECISION_HELP)

    pl = sub.add_parser("plan", help="world size, batch, DeepSpeed autos, memory per GPU, launch command; no process group",
                        description="Check a run config against an accelerate config (and its DeepSpeed JSON) and print "
                        "what the launch will do, without starting anything. Exit 2 on any contradiction.")
    pl.add_argument("config", help="run config YAML")
    pl.add_argument("--output-dir", help="as train's: parent of the run directory (config: output_dir); in the commands printed")
    pl.add_argument("--run-name", help="as train's: run directory name; in the commands printed")
    pl.add_argument("--accelerate-config", help="accelerate YAML (e.g. configs/accelerate/deepspeed_zero3.yaml)")
    pl.add_argument("--nodes", type=_count, help="machines (default: num_machines of the accelerate config, else 1)")
    pl.add_argument("--gpus-per-node", type=_count, help="processes per machine (default: from the accelerate config)")
    pl.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="dotted config overrides")

    x = sub.add_parser("export", help="checkpoint (any engine, sharded or not) -> Hugging Face model dir, offline",
                       description="Merge a checkpoint (DeepSpeed ZeRO shards, FSDP shards, or a plain state) into a "
                       "Hugging Face safetensors model with tokenizer and labels. Runs in one process, no process group.")
    x.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-NNNNNN")
    x.add_argument("out_dir", help="new directory to write (must not exist)")
    x.add_argument("--trust-checkpoint", action="store_true",
                   help="read ZeRO or FSDP shards (pickles: loading runs code) of a checkpoint your launcher did not "
                   "write, such as another user's or a download")
    x.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)

    sub.add_parser("env", help="versions, devices and Slurm variables: the block to paste into a bug report")

    s = sub.add_parser("synth", help="write synthetic clause data (train.jsonl, validation.jsonl)")
    s.add_argument("out_dir")
    s.add_argument("--n-train", type=_count, default=1000)
    s.add_argument("--n-validation", type=_count, default=250)
    s.add_argument("--seed", type=_seed, default=0)
    return p


def cmd_train(args) -> int:
    from launcher.config import load_config
    from launcher.runtime import env_world_size

    launch_flags = [f for f in ("num_processes", "nodes", "machine_rank", "main_process_ip", "main_process_port")
                    if getattr(args, f) is not None]
    if args.accelerate_config:
        # Each rank would start a launch of its own. torchrun sets TORCHELASTIC_RUN_ID;
        # accelerate's one-process launch always sets these three together (a user may set
        # one, ACCELERATE_USE_CPU, as a switch); not LOCAL_RANK, which container hooks under
        # srun (pyxis's PyTorch hook) export to a plain `launcher train --accelerate-config`.
        one_process = ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")
        if "TORCHELASTIC_RUN_ID" in os.environ or all(v in os.environ for v in one_process):
            raise UserError("--accelerate-config: this process is already one rank of a launch (accelerate launch or "
                            "torchrun started it); drop --accelerate-config there, or run launcher train "
                            "--accelerate-config without accelerate launch")
        return _train_under_accelerate(args)
    if launch_flags:
        raise UserError(f"--{launch_flags[0].replace('_', '-')}: only with --accelerate-config")
    cfg = load_config(args.config, args.overrides, output_dir=args.output_dir, run_name=args.run_name,
                      world_size=env_world_size())
    from launcher import faults
    from launcher.trainer import train

    created = _what_this_attempt_creates(cfg)
    faults.point("started")
    try:
        train(cfg)
    except UserError:
        _remove_created(created)
        raise
    return 0


def _what_this_attempt_creates(cfg) -> dict:
    """Paths a fresh run creates, noted before it starts: the output and run directories and
    the default MLflow store (with its artifacts directory)."""
    # normalised: missing/../x does not exist as written (missing/ does not), though x may
    out = Path(os.path.abspath(cfg.output_dir))
    store, artifacts = out / "mlflow.db", out / "mlartifacts"
    absent = [p for p in (out, *out.parents) if not p.exists()]
    return {"output_dir": out if not out.exists() else None,
            "above": absent[1:],  # the folders above it that the run's mkdir makes, lowest first
            "run_dir": cfg.run_dir if not cfg.run_dir.exists() else None,
            "store": store if not cfg.tracking.uri and not store.exists() else None,
            "artifacts": artifacts if not cfg.tracking.uri and not artifacts.exists() else None}


# What a failed start may leave in an output directory that is no other run's.
_SHARED_BY_RUNS = {"mlflow.db", "mlflow.db-journal", "mlartifacts", ".cache"}


def _remove_created(created: dict) -> None:
    """Bad input found once the run directory exists (a LoRA target the model lacks, fewer
    rows than one global batch) leaves nothing behind: what this attempt created goes, on
    rank 0, unless a checkpoint was completed (work is never deleted). The output directory
    and the MLflow store are another run's too once another run directory sits beside ours:
    jobs of an array started together into a new directory each saw it absent, and the one
    that failed removed the whole directory, its siblings' runs and store with it. Then only
    our run directory goes. (Not seen: a sibling that has not made its run directory yet,
    still loading its model; that window remains.) The run directory is ours only if this
    process took it (holds its lease): a launch of the same --run-name started together saw it
    absent too, and, refused, removed the winner's files as it trained."""
    import shutil

    from launcher import owner, tracking
    from launcher.runtime import env_rank

    if env_rank() != 0:
        return
    tracking.settle()  # the MLflow warm-up thread may still be creating the store
    run_dir = created["run_dir"] if created["run_dir"] is not None and owner.held_here(created["run_dir"]) else None
    if run_dir is not None and any((run_dir / "checkpoints").glob("*/COMPLETE")):
        return
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    out = created["output_dir"] or next((p.parent for p in (created["store"], created["artifacts"]) if p), None)
    if out is None:
        return
    try:
        others = [p.name for p in out.iterdir() if p.name not in _SHARED_BY_RUNS
                  and not p.name.startswith(".launcher-stop-")]  # slurm/train.sh's stop directory
    except OSError:
        return
    if others:
        return
    for path in (created["store"], created["artifacts"]):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if created["output_dir"] is not None:
        shutil.rmtree(created["output_dir"], ignore_errors=True)
        for folder in created.get("above", []):  # left empty (rmdir: not one another job wrote in meanwhile)
            try:
                folder.rmdir()
            except OSError:
                break


def check_run(args, launch) -> str | None:
    """What each rank of `launch` would refuse in the run config, checked once in this process
    (UserError); the note when the run adopts the launch's precision."""
    from launcher import distributed, engines
    from launcher.config import load_config

    cfg = load_config(args.config, args.overrides, output_dir=args.output_dir, run_name=args.run_name,
                      world_size=launch.num_processes)
    cfg, note = distributed.adopt_precision(cfg, launch)
    problems = engines.launch_problems(cfg.train, cfg.model, launch) + engines.host_problems(cfg.train, cfg.model, launch)
    if problems:
        raise UserError(*problems)
    return note


def _train_under_accelerate(args) -> int:
    """`launcher train CONFIG --accelerate-config F ...`: every check that `accelerate launch
    -m launcher train` would run on each rank runs here once, so a bad config is one line and
    exit 2 before any rank starts; then this process becomes `accelerate launch`."""
    from launcher import distributed

    if (args.nodes or 1) > 1 and (args.machine_rank is None or args.main_process_ip is None):
        raise UserError("--nodes: more than one machine needs --machine-rank and --main-process-ip")
    launch = distributed.from_yaml(args.accelerate_config, num_processes=args.num_processes, num_machines=args.nodes)
    if args.machine_rank is not None and not 0 <= args.machine_rank < launch.num_machines:
        # (it waited for machines that would never come, until the rendezvous timed out)
        launch.problems.append(f"--machine-rank: {args.machine_rank} is not one of the {launch.num_machines} machine(s) "
                               f"(0..{launch.num_machines - 1})")
    if launch.problems:  # the counts themselves: a batch checked against them would be checked wrong
        raise UserError(*launch.problems)
    note = check_run(args, launch)
    cmd = [sys.executable, "-m", "launcher.launch", "--config_file", args.accelerate_config]  # accelerate launch, Ctrl-C a stop
    if args.num_processes is not None:
        cmd += ["--num_processes", str(args.num_processes)]
    if args.nodes is not None:
        cmd += ["--num_machines", str(args.nodes)]
    if args.machine_rank is not None:
        cmd += ["--machine_rank", str(args.machine_rank)]
    if args.main_process_ip is not None:
        cmd += ["--main_process_ip", args.main_process_ip]
    if args.main_process_port is not None:
        cmd += ["--main_process_port", str(args.main_process_port)]
    cmd += ["-m", "launcher", "train", args.config]
    for flag, value in (("--output-dir", args.output_dir), ("--run-name", args.run_name)):
        if value is not None:
            cmd += [flag, value]
    cmd += list(args.overrides)
    print(f"checked {args.config} with {args.accelerate_config}"
          f"{' (' + note + ')' if note else ''}: {launch.num_processes} process(es) on {launch.num_machines} machine(s)",
          flush=True)
    from launcher.preemption import launch_env

    # signals (Slurm's, Ctrl-C) now reach accelerate directly; torchrun's grace after a SIGTERM
    # is raised unless set, so the scheduler's own grace decides (preemption.py)
    os.execve(sys.executable, cmd, {**launch_env(dict(os.environ)), RUN_CHECKED: "1"})
    return 0  # pragma: no cover


def cmd_plan(args) -> int:
    from launcher import distributed, engines
    from launcher.config import load_config
    from launcher.plan import plan, resume_line

    if (args.nodes is None) != (args.gpus_per_node is None) and args.accelerate_config is None:
        raise UserError("--nodes and --gpus-per-node go together when there is no --accelerate-config")
    if args.accelerate_config:
        launch = distributed.from_yaml(args.accelerate_config)
        if args.nodes or args.gpus_per_node:  # read again with the counts: its checks see them, as a launch's do
            nodes = args.nodes or launch.num_machines
            launch = distributed.from_yaml(args.accelerate_config, nodes * (args.gpus_per_node or launch.processes_per_machine),
                                           nodes)
    else:
        launch = distributed.LaunchConfig(source="no accelerate config")
    nodes = args.nodes or launch.num_machines
    per_node = args.gpus_per_node or launch.processes_per_machine
    launch.num_machines, launch.num_processes = nodes, nodes * per_node
    if not args.accelerate_config and launch.num_processes > 1:
        launch.distributed_type = "MULTI_GPU"
    cfg = load_config(args.config, args.overrides, output_dir=args.output_dir, run_name=args.run_name,
                      world_size=launch.num_processes)
    cfg, _ = distributed.adopt_precision(cfg, launch)
    engines.check_or_raise(cfg.train, cfg.model, launch)
    print(plan(cfg, args.config, args.overrides, args.accelerate_config, launch,
               {"output_dir": args.output_dir, "run_name": args.run_name}, resume_line(cfg)))
    return 0


def cmd_export(args) -> int:
    from launcher import engines
    from launcher.checkpoint import export_checkpoint

    engines.quiet_deepspeed_on_cpu()  # (its "unable to detect" a GPU went to stdout before the export's line)
    out = Path(args.out_dir)
    if probe := file_in_the_way(out.parent):  # (OUT_DIR itself existing is export_checkpoint's refusal)
        raise UserError(f"OUT_DIR: {probe} is a file, not a directory")
    from launcher.checkpoint import MARKER

    if (Path(args.checkpoint) / MARKER).is_file() and out.resolve().is_relative_to(Path(args.checkpoint).resolve()):
        # (it broke the checkpoint's signature)
        raise UserError(f"OUT_DIR: {out} is inside the checkpoint {args.checkpoint}, whose seal covers its files; "
                        "choose a directory outside it")
    source = export_checkpoint(Path(args.checkpoint), out, trusted=args.trust_checkpoint,
                               trust_remote_code=args.trust_remote_code)
    print(f"{out}: Hugging Face model from {source}")
    return 0


def _within_positions(asked: int | None, model, room: int = 0) -> None:
    """--max-length past a learned position table: the classifier cut texts to the table without
    a word, and an SFT model indexed past it (an index error deep in the embedding)."""
    from launcher.models import position_limit

    limit = position_limit(model)
    if room and limit is not None and room >= limit:
        raise UserError(f"--max-new-tokens: {room} leaves no room for a prompt in the model's {limit} positions; "
                        f"give fewer than {limit}")
    if asked and limit is not None and asked + room > limit:
        answers = f" less {room} tokens for the answer" if room else ""
        raise UserError(f"--max-length: {asked} is more tokens than the model has positions for ({limit}{answers}); "
                        f"give {limit - room} or less")


def _room_for_text(asked: int | None, tokenizer) -> None:
    """--max-length no longer than a classifier's own tokens ([CLS] and [SEP]): the tokenizer
    then cuts nothing, so 1 scored whole texts as if unlimited and 2 scored every text alike."""
    own = tokenizer.num_special_tokens_to_add()
    if asked is not None and asked <= own:
        raise UserError(f"--max-length: {asked} leaves no room for text (the tokenizer adds {own} tokens of its own); "
                        f"give more than {own}")


def _not_a_file(flag: str, path: Path) -> str:
    if path.is_dir():  # (a save_to_disk folder, which training takes, was "file not found")
        return f"{flag}: {path}: a directory; give a file (JSONL, CSV or Parquet; plain text for predict)"
    if path.exists():  # (eval's --data <(...) was "file not found")
        return f"{flag}: {path}: not a regular file (a pipe?); give a JSONL, CSV or Parquet file"
    return f"{flag}: {path}: file not found"


def _streamed(path: Path) -> bool:
    """--input - (standard input), or a path that reads but is neither a file nor a directory
    (/dev/stdin, a FIFO, a shell's <(...)): plain lines, read once (it was "file not found")."""
    return str(path) == "-" or (path.exists() and not path.is_file() and not path.is_dir())


def _plain_lines(path: Path, wanted: str, columns: tuple[str, ...], for_prompts: bool = False) -> list[tuple[int, str]]:
    """--input as plain text: its non-blank lines with their line numbers (the answers carry them
    as `line`: with a blank line skipped, the n-th answer was not line n), a byte-order mark
    skipped; not UTF-8 is one line."""
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"--input: {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        if raw[:2] == b"\x1f\x8b":  # (as the row readers say it)
            raise UserError(f"--input: {path}: gzip-compressed, not text; decompress it first (gunzip)") from None
        raise UserError(f"--input: {path}: not UTF-8 text (byte {e.start + 1}); give JSONL, CSV or Parquet {wanted}") from None
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1)  # not splitlines: \x0c, U+2028 are text
             if line.strip()]
    if lines:  # no name says JSON rows there (a pipe, a .txt): they were clauses or prompts, braces and all
        _not_a_table(path, lines[0][1], columns, tabs=not for_prompts)  # (a prompt may hold a tab)
    return lines


def _read_clauses(path: Path, column: str = "text") -> list[dict]:
    """Rows to predict, each with its text (in `column`, the export's data.text_column): rows
    from JSONL (or a .json array), CSV or Parquet, as `launcher eval` reads them (errors as
    file:line), or the plain lines of any other file."""
    from launcher.data.clauses import read_records

    if not path.is_file() and not _streamed(path):
        raise UserError(_not_a_file("--input", path))
    if _streamed(path) or path.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        # A CSV's header and quoted rows were read as clauses; a Parquet file failed with a traceback.
        lines = _plain_lines(path, f"rows with {column!r}, or one clause per line", (column,))
        return [{"line": n, column: line} for n, line in _some(lines, BadRows(""), path)]
    texts: list[dict] = []
    bad = BadRows(f"--input: {path}")
    columns: dict = {}  # (ordered as the file names them)
    for where, record in read_records(path):
        columns.update(dict.fromkeys(record) if isinstance(record, dict) else {})
        if isinstance(record, UserError):
            bad.add(record.problems)
        elif isinstance(record, ShortRow) and record.get(column) is None:
            bad.add([record.problem(where)])
        elif not isinstance(record, dict) or not isinstance(record.get(column), str):
            bad.add([f"{where}: expected an object with a string {column!r}"])
        elif not record[column].strip():  # as training and eval refuse it: a prediction for no clause
            bad.add([f"{where}: missing or empty {column!r}"])
        else:
            texts.append(record)
    if columns and column not in columns:  # one line for the file, not one per row
        from launcher.data.clauses import column_hint

        listed = ", ".join(repr(c) for c in columns if isinstance(c, str))
        trained = ", the model's data.text_column," if column != "text" else ""
        raise UserError(f"--input: {path}: no {column!r} column{trained} (its columns: {listed}){column_hint(list(columns))}")
    return _some(texts, bad, path)


def _not_a_table(path: Path, first: str, columns: tuple[str, ...], tabs: bool = True) -> None:
    """A file read as plain lines whose first line is a JSON row, a tab-separated header, or a
    CSV header naming a column the model reads (`columns`; a .txt saved from a spreadsheet, a
    pipe): each line was predicted as a clause, JSON braces and header included."""
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if isinstance(row, dict):
        raise UserError(f"--input: {path}: its lines are JSON rows, read only from a .jsonl file; "
                        + ("give them as one" if _streamed(path) else "rename it"))
    if tabs and "\t" in first and "text" in (c.strip() for c in first.split("\t")):
        raise UserError(f"--input: {path}: a tab-separated table; give it as CSV, JSONL or Parquet with a 'text' column")
    names = [c.strip().strip('"').strip().lower() for c in re.split(r"[,;]", first)]
    if len(names) > 1 and all(re.fullmatch(r"\w+", c) for c in names) and set(names) & {c.lower() for c in columns}:
        # (a clause such as "text, images and posts" has words with spaces between commas)
        raise UserError(f"--input: {path}: a CSV table (its header: {first.strip()}), read only from a .csv file; "
                        + ("give it as one" if _streamed(path) else "rename it"))


def _some(rows: list, bad: BadRows, path: Path) -> list:
    """Predict's rows once all were read: the bad ones (as every command lists them) or, for
    a file with none, one line; an empty output for an empty input hid a wrong file."""
    bad.check()
    if not rows:
        raise UserError(f"--input: {path}: no rows")
    return rows


# Set for launcher.launch when `launcher train --accelerate-config` has checked the run already.
RUN_CHECKED = "LAUNCHER_RUN_CHECKED"


def _exported_task(model_dir: str) -> str:
    """The export's task: launcher.json's; for a plain model folder without one, what it is
    (models.task_by_what_it_is), once it is not a run directory or checkpoint given by mistake."""
    from launcher.models import export_meta, task_by_what_it_is

    meta = export_meta(model_dir)
    if meta:
        return meta.get("task", "classification")
    _not_an_export(Path(model_dir))
    return task_by_what_it_is(model_dir)


def _not_an_export(folder: Path) -> None:
    """A run directory, a checkpoint or a checkpoints/ folder given where an exported model was
    meant: one line that names what to give (transformers said "Should have a model_type key")."""
    from launcher.checkpoint import MARKER, latest_in, looks_like_checkpoint, unsealed_in
    from launcher.models import is_model_folder

    if (folder / "model" / "launcher.json").is_file():
        raise UserError(f"MODEL_DIR: {folder} is a run directory; its exported model is {folder / 'model'}")
    if (folder / MARKER).is_file():
        raise UserError(f"MODEL_DIR: {folder} is a checkpoint, not an exported model; "
                        f"`launcher export {folder} OUT_DIR` writes one")
    if folder.name in ("adapter", "base") and (folder.parent / "launcher.json").is_file():  # a LoRA export's parts
        part = "LoRA adapter" if folder.name == "adapter" else "base model under the LoRA adapter"
        raise UserError(f"MODEL_DIR: {folder} is the {part} of the export {folder.parent}; give {folder.parent}, "
                        "which holds the merged model")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        try:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path", "")
        except (OSError, ValueError, AttributeError):  # (the loader says what is wrong with it)
            base = ""
        if base is None:  # (it was looked up as the hub repository "None", five retries, then a network error)
            raise UserError(f"MODEL_DIR: {folder} is a LoRA adapter that names no base model "
                            "(adapter_config.json: base_model_name_or_path is null); give the merged model")
    if not folder.is_dir() or is_model_folder(folder):  # a plain model, adapter or GGUF folder: the loader reads it
        return
    if looks_like_checkpoint(folder):
        try:
            found = latest_in(folder.parent)
        except OSError:  # a parent this user cannot list: no hint
            found = None
        raise UserError(f"MODEL_DIR: {folder} is an incomplete checkpoint (no {MARKER} marker)"
                        + (f"; `launcher export {found} OUT_DIR` writes a model from the latest complete one" if found else ""))
    try:
        found, unsealed = latest_in(folder), unsealed_in(folder)
    except OSError:  # a folder this user cannot list: transformers' own line follows
        return
    if found is not None:
        raise UserError(f"MODEL_DIR: {folder} holds checkpoints but no exported model; "
                        f"`launcher export {found} OUT_DIR` writes one from the latest")
    if unsealed:
        raise UserError(f"MODEL_DIR: {folder} holds no exported model and no complete checkpoint ({len(unsealed)} "
                        f"without a {MARKER} marker, written in part): nothing to load or export yet")


def cmd_eval(args) -> int:
    from launcher.data.clauses import LabelEncoder, parse_rows, read_records
    from launcher.models import export_meta
    from launcher.tasks import classification as task

    data = Path(args.data)
    if not data.is_file():
        raise UserError(_not_a_file("--data", data))
    if _exported_task(args.model_dir) == "causal_lm":
        from launcher.data.instructions import read_rows
        from launcher.tasks import causal_lm

        model, tokenizer, fmt, meta = causal_lm.load_exported(args.model_dir, args.trust_remote_code)
        rows = read_rows(data, fmt, mappable=False)
        _within_positions(args.max_length, model)
        max_length = args.max_length or meta.get("max_length") or 512  # the training max_length the export recorded
        candidates = causal_lm.exported_candidates(meta, fmt, tokenizer)
        notes: list[str] = []
        with _precision(args, args.model_dir, model, note=True):
            metrics = causal_lm.evaluate_rows(model, tokenizer, fmt, rows, max_length, candidates,
                                              meta.get("max_new_tokens", 32), args.batch_size,
                                              meta.get("truncation", "truncate"), notes)  # as the run evaluated
        for note in notes:
            print(note, file=sys.stderr)
        _say(json.dumps(metrics))
        return 0
    model, tokenizer, names, multilabel, cuts = task.load_exported(args.model_dir, args.trust_remote_code)
    _within_positions(args.max_length, model)
    _room_for_text(args.max_length, tokenizer)
    # Labels read as training read them: in its recorded mode (an export from before multiclass,
    # or not launcher's: two classes as binary, more as multiclass), from its columns.
    meta = export_meta(args.model_dir)
    recorded = meta.get("mode") if meta.get("mode") in ("binary", "multiclass") else None
    mode = "multilabel" if multilabel else recorded or ("binary" if len(names) == 2 else "multiclass")
    encoder = LabelEncoder(mode, names, meta.get("text_column") or "text", meta.get("label_column"), exported=True)
    texts, targets = parse_rows(read_records(data), encoder, str(data))
    import torch

    cut: list[int] = []
    with _precision(args, args.model_dir, model, note=True):
        logits = task.batched_logits(model, tokenizer, texts, args.max_length, args.batch_size, cut)
    _say_cut(cut, texts, model, args.max_length)
    labels = torch.tensor(targets, dtype=torch.float if multilabel else torch.long)
    counts = labels.sum(0) if multilabel else torch.bincount(labels, minlength=len(names))
    absent = [repr(name) for name, n in zip(names, counts.tolist()) if n == 0]
    if absent:  # (as training says of its validation rows: an all-fair file scored macro-F1 0.5 without a word)
        print(f"note: no row of {data} has {', '.join(absent)}: an F1 of 0 for each counts in the macro-F1", file=sys.stderr)
    metrics = task.compute_metrics(logits, labels, names, cuts)  # the export's decision rule
    if cuts is not None:  # a tuned rule: the 0.5 rule's figures beside it, nothing hidden
        metrics.update({f"{k}@0.5": v for k, v in task.compute_metrics(logits, labels, names).items()})
    weights = getattr(model, "launcher_class_weights", None)  # the run's: the same evaluation loss as its own
    weights = None if weights is None else torch.tensor(weights, dtype=torch.float)
    metrics["loss"] = task.mean_loss(task.per_example_loss(logits, labels, weights), labels, weights)
    metrics["n"] = len(texts)
    _say(json.dumps(metrics))
    return 0


def cmd_generate(args) -> int:
    from launcher.tasks import causal_lm

    if not args.prompt.strip():  # (it was answered all the same)
        raise UserError("--prompt: empty: nothing to answer")
    if not Path(args.model_dir).is_dir():  # (it said "not a causal-LM export" of a typo)
        from launcher.models import not_a_model_dir

        raise UserError(not_a_model_dir(args.model_dir))
    if _exported_task(args.model_dir) != "causal_lm":
        said = "launcher.json's task" if (Path(args.model_dir) / "launcher.json").is_file() else "config.json's architectures"
        raise UserError(f"{args.model_dir}: not a causal LM (by its {said}); a classifier answers through launcher predict")
    model, tokenizer, fmt, meta = causal_lm.load_exported(args.model_dir, args.trust_remote_code)
    _within_positions(None, model, args.max_new_tokens)  # (a prompt cut to nothing was answered)
    lengths: list[int] = []
    cut: list[int] = []
    with _precision(args, args.model_dir, model):
        answer = causal_lm.generate(model, tokenizer, fmt, args.prompt, args.max_new_tokens, lengths, cut)
    if cut:  # (as predict says it: the answer is to the prompt's end only)
        print(f"note: the prompt was longer than {lengths[0]} tokens (the model's position table less the answer's "
              "room): it was answered from its end", file=sys.stderr)
    note = causal_lm.long_prompts_note(lengths, meta, model, args.max_new_tokens)
    if note:  # (answered without a word, from positions the model never trained on)
        print(note, file=sys.stderr)
    _say(answer)
    return 0


class _Output:
    """Where predictions go: stdout, or --output. A regular file (or none yet) is written whole
    at the end through a temporary file beside it, made now, before the model loads: a place
    that cannot be written is one line then, not a traceback after every row was answered, and
    a failure leaves an existing file as it was (its mode kept; a link stays a link). Anything
    else (/dev/stdout, a FIFO, /dev/null) is opened and written as it is."""

    def __init__(self, output: str | None):
        if output is not None and not output.strip():  # (an unset variable in a script: it went to stdout)
            raise UserError("--output: empty; give a file, or - for standard output")
        self.path, self.replacement = (Path(output) if output and output != "-" else None), None  # "-": stdout
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_file() and not self.path.is_dir():
            return  # /dev/stdout (a pipe's: its real path names no file), a FIFO, /dev/null
        if self.path.suffix.lower() in (".csv", ".tsv", ".parquet", ".xlsx"):  # (JSON lines went into out.csv)
            raise UserError(f"--output: {self.path}: predictions are written as JSON lines; name it "
                            f"{self.path.with_suffix('.jsonl').name}")
        if self.path.is_dir() or not self.path.parent.is_dir():
            probe = file_in_the_way(self.path.parent)  # (a file above it was "no such directory")
            raise UserError(f"--output: {self.path}: " + ("is a directory" if self.path.is_dir() else
                                                          f"{probe} is a file, not a directory" if probe else
                                                          f"no such directory {self.path.parent}"))
        target = Path(os.path.realpath(self.path))  # where a link leads: the file replaced
        if target.exists() and not target.is_file():
            return
        from launcher.files import Replacement

        try:
            self.replacement = Replacement(target)
        except OSError as e:
            raise UserError(f"--output: {self.path}: cannot create a file in {target.parent} ({e.strerror})") from None

    def write(self, lines) -> None:
        if self.path is None:
            _say_lines(lines)
            return
        if self.replacement is None:
            try:
                with open(self.path, "w") as f:
                    f.writelines(lines)
            except OSError as e:
                raise UserError(f"--output: {self.path}: {e.strerror or e}; not all written") from None
            return
        try:
            self.replacement.commit("".join(lines))
        except OSError as e:
            raise UserError(f"--output: {self.path}: {e.strerror}; nothing written") from None

    def discard(self) -> None:
        if self.replacement is not None:
            self.replacement.discard()


def cmd_predict(args) -> int:
    if args.output and Path(args.output).is_file() and Path(args.input).is_file() \
            and os.path.samefile(args.output, args.input):  # (the rows were replaced by their predictions)
        raise UserError(f"--output: {args.output}: is the --input file; write the predictions elsewhere")
    out = _Output(args.output)  # before the model loads and every row is answered
    try:
        if _exported_task(args.model_dir) == "causal_lm":
            out.write(_predict_causal_lm(args))
        else:
            out.write(_predict_classes(args))
    finally:
        out.discard()
    return 0


def _predict_classes(args) -> list[str]:
    from launcher.models import export_meta
    from launcher.tasks import classification as task

    if args.max_new_tokens:  # (it was ignored: a classifier writes no answer)
        raise UserError(f"--max-new-tokens: for a causal LM's answers; {args.model_dir} is a classifier")
    column = export_meta(args.model_dir).get("text_column") or "text"  # (as training read its rows)
    rows = _read_clauses(Path(args.input), column)
    texts = [row[column] for row in rows]
    model, tokenizer, names, multilabel, cuts = task.load_exported(args.model_dir, args.trust_remote_code)
    _within_positions(args.max_length, model)
    _room_for_text(args.max_length, tokenizer)
    cut: list[int] = []
    with _precision(args, args.model_dir, model):
        logits = task.batched_logits(model, tokenizer, texts, args.max_length, args.batch_size, cut)
    _say_cut(cut, texts, model, args.max_length)
    probs = task.probabilities(logits, multilabel)
    return [json.dumps(_written_back(row, task.prediction_record(p, names, multilabel, cuts)), default=str) + "\n"
            for row, p in zip(rows, probs)]


def _say_cut(cut: list[int], texts: list[str], model, max_length: int | None) -> None:
    """A classifier's texts longer than it reads, counted on stderr (each was scored on its
    start, without a word, where predict for a causal LM said so)."""
    from launcher.tasks import classification as task

    if cut:
        limit, why = task.text_limit(model, max_length)
        print(f"note: {len(cut)} of {len(texts)} texts were longer than {limit} tokens ({why}): each was scored on its "
              f"first {limit}", file=sys.stderr)


def _written_back(row: dict, prediction: dict) -> dict:
    """An input row with its prediction (an id column joins it to the input). A column of the
    row that the prediction also names (a gold `label`, a reference `response`) stays, as
    input_<name>: it was overwritten by the prediction without a word. So does a gold `label`
    beside a predicted `labels` (multilabel), and `labels` beside `label`: either read as the
    prediction. Columns already named input_<name> get one more input_ (a file that predict
    wrote, predicted again, keeps its gold input_label as input_input_label: nothing is lost)."""
    named = set(prediction) | ({"label", "labels"} if {"label", "labels"} & set(prediction) else set())
    taken = named & set(row)  # (a row without the column keeps its input_<name> as it is)

    def name(key: str) -> str:
        base = key
        while base.startswith("input_"):
            base = base[len("input_"):]
        return f"input_{key}" if base in taken else key

    return {**{name(k): v for k, v in row.items()}, **prediction}


def _prompt_rows(path: Path, fmt, tokenizer, records: list[dict], rows: list[dict], bad: BadRows) -> None:
    """A table's rows to answer (appended to `records`, and normalized to `rows`; the bad ones to
    `bad`). A file of no known shape is one line (as a classifier's), not one per row."""
    from launcher.data import prompts
    from launcher.data.clauses import read_records

    columns: dict = {}
    for where, record in read_records(path):
        columns.update(dict.fromkeys(record) if isinstance(record, dict) else {})
        try:
            row = prompts.normalize(record, fmt, where, need_answer=False)
            prompts.prompt_text(row, fmt, tokenizer)  # a conversation with nothing to answer says so here
            if fmt.prompt is None and not prompts.question(row).strip():  # (it was answered all the same)
                alone = "messages" in row and not any(m["role"] == "user" for m in row["messages"])
                raise UserError(f"{where}: {'the conversation has no user turn' if alone else 'an empty prompt'}: "
                                "nothing to answer")
            rows.append(row)
            records.append(record)
        except UserError as e:
            bad.add([p if p.startswith(where) else f"{where}: {p}" for p in e.problems])
    # (the answer's columns are not needed to answer)
    if columns and (problems := prompts.column_problems([str(c) for c in columns], fmt.replace(response=None),
                                                        f"--input: {path}", mappable=False)):
        raise UserError(*problems)


def _predict_causal_lm(args) -> list[str]:
    """Each input row answered as training taught: its prompt rendered from the columns the
    prompt needs (a clause's `text` alone for a recipe that maps {text}), the row written back
    with its greedy `response`; with a closed answer set also `label` (the likeliest candidate)
    and `probs` (the candidates' likelihoods, normalised over the set)."""
    import math

    from launcher.data import prompts
    from launcher.tasks import causal_lm, generation

    path = Path(args.input)
    if not path.is_file() and not _streamed(path):
        raise UserError(_not_a_file("--input", path))
    model, tokenizer, fmt, meta = causal_lm.load_exported(args.model_dir, args.trust_remote_code)
    records: list[dict] = []
    rows: list[dict] = []
    bad = BadRows(f"--input: {path}")
    if not _streamed(path) and path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        _prompt_rows(path, fmt, tokenizer, records, rows, bad)
    else:  # plain text, one prompt per line: the mapped column when the prompt names one, else the instruction
        columns = tuple(prompts.placeholders(fmt.prompt)) if fmt.prompt else ("instruction", "prompt", "messages", "conversations")
        for n, line in _plain_lines(path, "rows, or one prompt per line", columns, for_prompts=True):
            rows.append(prompts.typed_row(line, fmt, str(path)))
            records.append({"line": n, "text": line})
    _some(rows, bad, path)
    candidates = causal_lm.exported_candidates(meta, fmt, tokenizer)
    # Training saw no prompt longer than its max_length (such rows have no answer left), so
    # none is cut to it here; only --max-length, or a learned position table (as generate's), cut one.
    # Answers stop where the run's evaluation answers did (its references' length + a margin).
    new_tokens = args.max_new_tokens or meta.get("answer_max_new_tokens") or meta.get("max_new_tokens", 32)
    _within_positions(args.max_length, model, new_tokens)
    limit = args.max_length or causal_lm.prompt_limit(model, new_tokens)
    cut: list[int] = []
    to_answer = causal_lm.prompt_rows(rows, fmt, tokenizer, limit, cut)
    if cut:  # (said nowhere: every row got an answer, some to the end of their prompt only)
        why = "--max-length" if args.max_length else "the model's position table less the answer's room"
        print(f"note: {len(cut)} of {len(rows)} prompts were longer than {limit} tokens ({why}): each was answered "
              "from its end", file=sys.stderr)
    note = causal_lm.long_prompts_note([len(r["input_ids"]) for r in to_answer], meta, model, new_tokens)
    if note:  # (answered without a word, from positions the model never trained on)
        print(note, file=sys.stderr)
    batches = generation.EvalBatches(to_answer, 0, 1, args.batch_size, causal_lm.pad_id(tokenizer))
    with _precision(args, args.model_dir, model):
        _, answered = generation.evaluate(model, batches, tokenizer, candidates, new_tokens,
                                          frame=causal_lm.answer_frame(fmt, tokenizer))
    lines = []
    for record, r in zip(records, answered):
        extra = {"response": r["response"]}
        if candidates is not None:
            top = max(r["scores"])
            weights = [math.exp(x - top) for x in r["scores"]]
            extra |= {"label": candidates.answers[r["choice"]],
                      "probs": {a: round(w / sum(weights), 6) for a, w in zip(candidates.answers, weights)}}
        lines.append(json.dumps(_written_back(record, extra), default=str) + "\n")  # (Parquet dates and such as text)
    return lines


def cmd_env(args) -> int:
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"launcher      {__version__}", f"python        {platform.python_version()} ({sys.executable})",
             f"platform      {platform.platform()}"]
    try:
        import torch

        cuda = torch.version.cuda or "none"
        lines.append(f"torch         {torch.__version__} (CUDA {cuda})")
        if torch.cuda.is_available():
            nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            lines.append(f"gpus          {len(names)} x {names[0]} (NCCL {nccl}, bf16 {torch.cuda.is_bf16_supported()})")
        else:
            lines.append("gpus          none visible")
    except ImportError:
        lines.append("torch         not installed")
    for name in ("accelerate", "deepspeed", "transformers", "peft", "datasets", "tokenizers", "mlflow", "wandb",
                 "flash-attn"):
        lines.append(f"{name:<14}{version(name)}")
    slurm = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_") and k in SLURM_VARS}
    lines.append("slurm         " + (", ".join(f"{k}={v}" for k, v in slurm.items()) if slurm else "not in a Slurm job"))
    print("\n".join(lines))
    return 0


SLURM_VARS = {"SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_NODEID", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT"}


def cmd_synth(args) -> int:
    from launcher.data.synthetic import write_splits

    if probe := file_in_the_way(args.out_dir):
        raise UserError(f"OUT_DIR: {probe} is a file, not a directory")
    held = [name for name in ("train.jsonl", "validation.jsonl") if os.path.lexists(Path(args.out_dir) / name)]
    if held:  # (they were replaced without a word: a real train.jsonl too)
        raise UserError(f"OUT_DIR: {Path(args.out_dir) / held[0]} exists; choose another directory, or remove it first")
    for path in write_splits(args.out_dir, args.n_train, args.n_validation, args.seed):
        print(path)
    return 0


COMMANDS = {"env": cmd_env, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "generate": cmd_generate, "plan": cmd_plan, "export": cmd_export,
            "synth": cmd_synth}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides may come before or after --output-dir/--run-name: collect stray key=value tokens.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("train", "plan") or any(x.startswith("-") or "=" not in x for x in extra):
            _Parser(prog=f"{parser.prog} {args.command}").error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' warnings say what launcher says in its own words (a new head: the run's
    # "initialised at random" line), or nothing a user of launcher can act on (a renamed
    # argument), in colour codes that end up in log files; as `make` runs it. Its errors show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' and the hub's own bars ("Loading weights", "Writing model shards" at every
    # save): a line of carriage returns per save in a log file, where launcher prints its own
    # progress. Read when they are imported; HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Deprecations inside the libraries (peft reading a renamed transformers attribute): nothing a
    # user of launcher can act on, printed at every start.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # peft imports bitsandbytes where it is installed, which on a CPU with AVX512-BF16 asks the
    # hub for an optional 4-bit CPU kernel at import: two warnings on every LoRA start (always
    # offline) about a speed-up whose fallback computes the same. Their errors still show.
    for name in ("kernels", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow's "Creating initial MLflow database tables..." on a new store: what launcher prints
    # (the run and where its store is) says it.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # datasets' "Failed to load JSON from file ... in row 6" before launcher's own line for the
    # same row (`FILE:7: not valid JSON`, counted from 1 as editors do): a second, off-by-one line.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    args = parse(argv)
    before = signal.getsignal(signal.SIGTERM)
    if args.command != "train":  # (training turns SIGTERM into a stop at the end of a step itself)
        _TERMINATES.append(os.getpid())
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        _report(e.problems)
        return 2
    except RunError as e:  # the machine failed a run that was going well: what happened, what is kept
        _report(e.problems)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training watches for it (a training run stops at a step end)
        print("launcher: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Terminated:  # as Ctrl-C: what the command was writing is removed on the way out
        print("launcher: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `launcher predict ... | head`: the reader has all it wanted
        if not _stdout_broken():
            raise  # another pipe (a socket, a child's): not ours to hide
        _quiet_stdout()
        return 141  # as a tool killed by SIGPIPE (128 + 13) ends, for a shell's pipefail
    finally:
        if before is not None:  # (main called in a process that goes on: the tests)
            signal.signal(signal.SIGTERM, before)


class Terminated(BaseException):
    """SIGTERM (`timeout`, a scheduler) in eval / predict / generate / export / synth: raised as
    Ctrl-C's KeyboardInterrupt is, so that their `finally` blocks remove what they were writing
    (killed outright, `predict --output` left its temporary file beside the output)."""


_TERMINATES: list[int] = []  # the process whose SIGTERM ends the command as Ctrl-C does


def _terminated(signum, _frame) -> None:
    if os.getpid() not in _TERMINATES:  # a forked worker (a datasets map pool): ended as it would be
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated()


def _stdout_broken() -> bool:
    """stdout's reader has left: the write end of a pipe with no reader polls as an error."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout)
        return False


def _say(text: str) -> None:
    _say_lines([text + "\n"])


def _say_lines(lines) -> None:
    """A command's result on stdout, flushed: a stdout that cannot take it (a full disk, /dev/full)
    is one line (it was a traceback); a reader that left is BrokenPipeError, as main expects.
    Line by line: one write of the whole text into a pipe whose reader left (`| head -1`) wrote
    part of it and raised nothing."""
    try:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _quiet_stdout()  # (else the flush at exit fails again, after the line)
        raise UserError(f"standard output: {e.strerror or e}; the result was not all written") from None


def _quiet_stdout() -> None:
    """stdout points at nothing once its reader left, so the flush at exit raises no second
    BrokenPipeError (Python's own advice for pipes)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout)
        pass


def _report(problems: list[str]) -> None:
    """One `error:` line per problem, from one rank.

    Usually every rank finds the same problem, and rank 0 reports it. The other ranks wait
    first: when rank 0 exits, torchrun stops them (SIGTERM, now fatal), so the report is
    printed once. Had one of them exited first, torchrun would have stopped rank 0 before
    it printed: a failed launch with no line at all (seen in CI). A rank still alive after
    the wait found a problem of its own, and reports it."""
    import signal
    import time

    from launcher.runtime import env_rank, env_world_size

    if env_rank() != 0 and env_world_size() > 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(REPORT_GRACE_S)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


REPORT_GRACE_S = 5.0


def run() -> None:
    """The process entry point (`launcher`, `python -m launcher`): main(), then a prompt exit.

    Once the work is done, Python's teardown of the modules a run loads (torch,
    transformers, datasets, mlflow, deepspeed) takes 2-3 s on 2 cores before the process
    ends, time a short job or a Slurm step pays for nothing. So after main() returns, the
    atexit handlers run as usual and stdio is flushed, then the process exits without that
    teardown. Every file the launcher writes is closed by then. An exception still takes
    the normal path (traceback, teardown), and so does a run under a profiler or debugger
    (`python -m cProfile -m launcher ...` writes its report at teardown). Library callers
    and tests use main()."""
    import atexit

    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:  # cProfile, a debugger: let them finish
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`launcher plan ... | head`)
            pass
    os._exit(code)

