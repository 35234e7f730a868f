"""End to end, one process: learning, files, MLflow, export, eval/predict, resume, safety."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import owner, tracking
from launcher.config import UNFAIR_TOS_CATEGORIES
from launcher.tracking import _point, wandb_rows

from conftest import FAST, NO_MLFLOW, OFFLINE_ENV, ROOT, TINY, all_runs, check, exported_checkpoint, launcher, mlflow_client, wandb_records

pytestmark = pytest.mark.slow


def test_learns_beyond_step0_and_chance(trained_binary):
    """The synthetic task has a keyword signal and 3% label noise, so a model that learned
    reaches macro-F1 around 0.97; chance (or always one class) is at most 0.5 for two
    balanced-ish classes. 0.85 leaves room for seed noise and still fails a non-learner."""
    _, run = trained_binary
    summary = json.loads((run / "final_metrics.json").read_text())
    before, after = summary["before"]["macro_f1"], summary["after"]["macro_f1"]
    assert after >= 0.85, summary
    assert after - before >= 0.3, summary
    assert summary["after"]["n"] == 400  # every validation row counted once


def test_a_damaged_export_or_input_or_output_is_one_line(trained_binary, tmp_path):
    """eval / predict / generate on what users hand them: an export copied without its
    tokenizer files (transformers built an empty 5-token BertTokenizer: every word [UNK], exit
    0), a launcher.json that is not a JSON object (a traceback), a classifier given to generate;
    a CSV whose header repeats a column (read as training reads it: the first copy) or with a
    row of extra fields (kept under a "null" key; training refuses it); a stdout or --output
    that cannot take the result (/dev/full: a traceback). Each is exit 2 and one line."""
    import shutil

    _, run = trained_binary

    def one_line(proc, start: str) -> None:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(errors) == 1 and errors[0].startswith("error: " + start), errors

    (tmp_path / "x.txt").write_text("We may end it.\n")
    bare = tmp_path / "bare"
    shutil.copytree(run / "model", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    one_line(launcher("predict", str(bare), "--input", str(tmp_path / "x.txt")),
             f"MODEL_DIR: {bare}: its tokenizer has no tokens but special ones")
    broken = tmp_path / "broken"
    shutil.copytree(run / "model", broken)
    for text, said in (('{"task": "classif', "not valid JSON ("), ("[1]", "not a JSON object")):
        (broken / "launcher.json").write_text(text)
        for command in (["predict", str(broken), "--input", str(tmp_path / "x.txt")], ["generate", str(broken), "--prompt", "hi"]):
            one_line(launcher(*command), f"MODEL_DIR: {broken / 'launcher.json'}: {said}")
    one_line(launcher("generate", str(run / "model"), "--prompt", "hi"), f"{run / 'model'}: not a causal LM (by its launcher.json's task)")
    ckpt = tmp_path / "ckpt"  # a checkpoint whose skeleton's launcher.json is damaged (a traceback)
    shutil.copytree(exported_checkpoint(run), ckpt)
    (ckpt / "skeleton" / "launcher.json").write_text('{"task": ')
    one_line(launcher("export", str(ckpt), str(tmp_path / "out")), f"CHECKPOINT: {ckpt / 'skeleton' / 'launcher.json'}: not valid JSON (")
    assert not (tmp_path / "out").exists()
    # Damaged in ways a copy or a hand edit leaves (each was a traceback and exit 1): weights
    # overwritten or cut short, config.json not JSON, a launcher.json field of the wrong type.
    weights = broken / "model.safetensors"
    shutil.copy(run / "model" / "launcher.json", broken / "launcher.json")
    for damage, said in ((lambda: weights.write_bytes(b"\0" * weights.stat().st_size), "its weights file is damaged"),
                         (lambda: os.truncate(weights, 5000), "its weights file is damaged"),
                         (lambda: (broken / "config.json").write_text("{bad"), "not a loadable Hugging Face model directory"),
                         (lambda: (broken / "launcher.json").write_text('{"max_length": "abc"}'),
                          f"{broken / 'launcher.json'}: max_length: expected a whole number"),
                         (lambda: (broken / "launcher.json").write_text('{"task": "weird"}'),  # (read as a classifier)
                          f"{broken / 'launcher.json'}: task: expected classification or causal_lm; got 'weird'")):
        damage()
        for command in (["predict", str(broken), "--input", str(tmp_path / "x.txt")],
                        ["eval", str(broken), "--data", str(tmp_path / "x.txt")]):
            proc = launcher(*command)
            one_line(proc, f"MODEL_DIR: {said}" if said.startswith(str(broken / "launcher.json")) else f"MODEL_DIR: {broken}: ")
            assert said in proc.stderr
        shutil.copytree(run / "model", broken, dirs_exist_ok=True)
    # A checkpoint whose weights were overwritten at their size, or whose tokenizer was removed
    # since it was sealed (exported with exit 0: the export then did not load); an OUT_DIR inside
    # the checkpoint (it broke the checkpoint's signature).
    shutil.rmtree(ckpt)
    shutil.copytree(exported_checkpoint(run), ckpt)
    inside = ckpt / "export"
    one_line(launcher("export", str(ckpt), str(inside)), f"OUT_DIR: {inside} is inside the checkpoint {ckpt}")
    assert not inside.exists()
    (ckpt / "skeleton" / "tokenizer.json").unlink()
    one_line(launcher("export", str(ckpt), str(tmp_path / "out")),
             f"{ckpt}: files were removed or changed size after it was sealed (skeleton/tokenizer.json: missing)")
    shutil.copy(exported_checkpoint(run) / "skeleton" / "tokenizer.json", ckpt / "skeleton" / "tokenizer.json")
    (ckpt / "model.safetensors").write_bytes(b"\0" * (ckpt / "model.safetensors").stat().st_size)
    one_line(launcher("export", str(ckpt), str(tmp_path / "out")), f"{ckpt}: its weights cannot be read (")
    assert not (tmp_path / "out").exists()

    (tmp_path / "dup.csv").write_text("text,text,text.1\nWe may end it.,We may not.,Nor we.\n")
    (tmp_path / "first.csv").write_text("text\nWe may end it.\n")
    (tmp_path / "ragged.csv").write_text("text,label\nWe may end it.,unfair\nWe may not.,fair,extra\n")
    dup = [json.loads(x) for x in check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "dup.csv"))).stdout.splitlines()]
    first = [json.loads(x) for x in check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "first.csv"))).stdout.splitlines()]
    import datasets

    trained = datasets.load_dataset("csv", data_files=str(tmp_path / "dup.csv"), split="train").to_list()
    assert [{k: v for k, v in dup[0].items() if k not in ("probs", "label")}] == trained  # (text, text.2, text.1)
    assert dup[0]["text"] == "We may end it." and dup[0]["probs"] == first[0]["probs"]
    one_line(launcher("eval", str(run / "model"), "--data", str(tmp_path / "ragged.csv")),
             f"{tmp_path / 'ragged.csv'}:3: 3 fields where the header names 2")

    full = subprocess.run([sys.executable, "-m", "launcher", "predict", str(run / "model"), "--input", str(tmp_path / "x.txt")],
                          stdout=open("/dev/full", "w"), stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE_ENV})
    one_line(full, "standard output: No space left on device")
    one_line(launcher("predict", str(run / "model"), "--input", str(tmp_path / "x.txt"), "--output", "/dev/full"),
             "--output: /dev/full: No space left on device")
    # /dev/stdout into a pipe (its real path names a pipe, no file: it was "cannot create a
    # file"), and "-", are stdout
    wanted = check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "x.txt"))).stdout
    for given in ("/dev/stdout", "-"):
        assert check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "x.txt"), "--output", given)).stdout == wanted
    assert not (ROOT / "-").exists()
    # Plain lines from standard input: --input -, /dev/stdin from a pipe ("file not found"), a
    # FIFO; JSON rows there are one line (they were read as clauses, braces and all)
    for given in ("-", "/dev/stdin"):
        piped = subprocess.run([sys.executable, "-m", "launcher", "predict", str(run / "model"), "--input", given],
                               input=(tmp_path / "x.txt").read_text(), capture_output=True, text=True,
                               env={**os.environ, **OFFLINE_ENV})
        assert check(piped).stdout == wanted, given
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", 'cat "$1" > "$2"', "sh", str(tmp_path / "x.txt"), str(fifo)])
    try:
        assert check(launcher("predict", str(run / "model"), "--input", str(fifo))).stdout == wanted
    finally:
        if writer.poll() is None:  # (launcher failed before opening it: the writer would block for good)
            writer.kill()
        writer.wait(timeout=60)
    rows = subprocess.run([sys.executable, "-m", "launcher", "predict", str(run / "model"), "--input", "-"],
                          input='{"text": "We may end it."}\n', capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    one_line(rows, "--input: -: its lines are JSON rows, read only from a .jsonl file; give them as one")
    one_line(launcher("predict", str(run / "model"), "--input", str(tmp_path / "x.txt"), "--max-new-tokens", "4"),
             f"--max-new-tokens: for a causal LM's answers; {run / 'model'} is a classifier")  # (it was ignored)


def test_run_directory_layout(trained_binary):
    _, run = trained_binary
    for name in ("config.yaml", "metrics.jsonl", "final_metrics.json", "training.png", "tokenizer/tokenizer.json",
                 "model/model.safetensors", "model/config.json", "model/tokenizer.json", "model/launcher.json"):
        assert (run / name).is_file(), name
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000050", "step-000100"]  # keep_last=2 (the best, step 50 or 100, is among them)
    for c in ckpts:
        assert (run / "checkpoints" / c / "COMPLETE").is_file()
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "fair", "1": "unfair"}
    # The weights are as readable as every other file (safetensors makes its files 0600
    # whatever the umask: a teammate could read an export's config but not its weights).
    weights = [*run.glob("model/*.safetensors"), *run.glob("checkpoints/*/**/*.safetensors")]
    assert len(weights) >= 3
    mode = (run / "model" / "config.json").stat().st_mode & 0o777
    assert {w.stat().st_mode & 0o777 for w in weights} == {mode}, [(w, oct(w.stat().st_mode)) for w in weights]


def test_exactly_one_mlflow_run_with_params_tags_metrics_artifacts(trained_binary):
    out, _ = trained_binary
    client = mlflow_client(out)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.global_batch_size"] == "32"
    assert run.data.params["derived.gradient_accumulation_steps"] == "2"
    assert run.data.tags["world_size"] == "1" and "launcher.version" in run.data.tags
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert loss_steps == list(range(1, 101))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/macro_f1")] == [0, 50, 100]
    for name in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "eval/loss", "eval/f1/unfair"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json", "training.png"} <= artifacts


def test_export_loads_in_pipeline_and_predicts_like_the_trained_model(trained_binary):
    from transformers import AutoTokenizer, pipeline

    from launcher.config import TaskConfig, load_config
    from launcher.tasks.classification import build_model

    _, run = trained_binary
    texts = [json.loads(l)["text"] for l in (run / "data" / "validation.jsonl").read_text().splitlines()][:64]
    # The exported model: rebuilt from the config, weights from the checkpoint of the exported
    # step (checkpoint.export: best -> the best evaluation's, kept for this).
    cfg = load_config(run / "config.yaml", check_files=False)
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = build_model(TaskConfig.of(cfg), tok).eval()
    model.load_state_dict(load_file(exported_checkpoint(run) / "model.safetensors"))
    exported = load_file(run / "model" / "model.safetensors")
    assert set(exported) == set(model.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        mine = [model.config.id2label[i] for i in model(**enc).logits.argmax(-1).tolist()]
    clf = pipeline("text-classification", model=str(run / "model"), device="cpu")
    theirs = [r["label"] for r in clf(texts, truncation=True, max_length=64)]
    assert theirs == mine
    assert {"fair", "unfair"} == set(mine)  # a collapsed model would make the comparison vacuous


def test_eval_and_predict_cli(trained_binary, tmp_path):
    _, run = trained_binary
    proc = check(launcher("eval", str(run / "model"), "--data", str(run / "data" / "validation.jsonl")))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    final = json.loads((run / "final_metrics.json").read_text())["after"]
    assert metrics["n"] == 400
    assert metrics["macro_f1"] == pytest.approx(final["macro_f1"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-4)
    assert set(metrics) >= {"macro_f1", "micro_f1", "loss", "n", "f1/fair", "f1/unfair"}

    clauses = tmp_path / "clauses.txt"
    clauses.write_text("We may terminate your account at any time without notice.\n\nYou can export your data whenever you like.\n")
    out = tmp_path / "pred.jsonl"
    check(launcher("predict", str(run / "model"), "--input", str(clauses), "--output", str(out)))
    preds = [json.loads(l) for l in out.read_text().splitlines()]
    assert [p["label"] for p in preds] == ["unfair", "fair"]
    # A blank line has no answer: each answer names its line (the second answer is line 3's)
    assert [p.pop("line") for p in preds] == [1, 3]
    for p in preds:
        assert set(p["probs"]) == {"fair", "unfair"} and sum(p["probs"].values()) == pytest.approx(1, abs=1e-5)
    # CSV (with Excel's byte-order mark) and Parquet rows as `eval` reads them: a CSV's header and
    # quoted cells were predicted as clauses, and a Parquet file failed with a traceback.
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t for t in clauses.read_text().splitlines() if t]
    table = tmp_path / "clauses.csv"
    table.write_bytes(("\ufefftext,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts))).encode())
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts]), tmp_path / "clauses.parquet")
    for path in (table, tmp_path / "clauses.parquet"):
        again = [json.loads(l) for l in check(launcher("predict", str(run / "model"), "--input", str(path))).stdout.splitlines()]
        assert [{k: v for k, v in p.items() if k != "id"} for p in again] == preds, path
        # each row written back with its prediction: an id column joins it to the input (it was dropped)
        assert [p.get("id") for p in again] == (["0", "1"] if path == table else [None, None]), path  # (CSV cells: text)
    # A gold label in the input stays beside the prediction (it was overwritten by it).
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"text": t, "label": "fair"}) + "\n" for t in texts))
    back = [json.loads(l) for l in check(launcher("predict", str(run / "model"), "--input", str(gold))).stdout.splitlines()]
    assert [(p["input_label"], p["label"]) for p in back] == [("fair", "unfair"), ("fair", "fair")]
    # Predicted again, the gold column moves one input_ further (it was overwritten by the first prediction)
    (tmp_path / "back.jsonl").write_text("".join(json.dumps(p) + "\n" for p in back))
    again = [json.loads(l) for l in check(launcher("predict", str(run / "model"), "--input",
                                                   str(tmp_path / "back.jsonl"))).stdout.splitlines()]
    assert [(p["input_input_label"], p["input_label"], p["label"]) for p in again] == [
        ("fair", "unfair", "unfair"), ("fair", "fair", "fair")]
    assert [p["input_probs"] for p in again] == [p["probs"] for p in back]
    # JSON rows, a tab-separated table or a CSV saved as .txt, read as plain lines: each line was
    # "a clause", header included; gzip was "not UTF-8 text".
    import gzip

    (tmp_path / "x.txt.gz").write_bytes(gzip.compress(clauses.read_bytes()))
    for name, content, said in (("x.ndjson", json.dumps({"text": texts[0]}) + "\n", "its lines are JSON rows, read only "
                                 "from a .jsonl file; rename it"),
                                ("x.tsv", f"text\tlabel\n{texts[0]}\t1\n", "a tab-separated table; give it as CSV, "
                                 "JSONL or Parquet with a 'text' column"),
                                ("sheet.txt", f'text,label\n"{texts[0]}",fair\n', "a CSV table (its header: text,label), "
                                 "read only from a .csv file; rename it"),
                                ("excel.txt", f'Text;Label\n"{texts[0]}";fair\n', "a CSV table (its header: Text;Label), "
                                 "read only from a .csv file; rename it"),
                                ("x.txt.gz", None, "gzip-compressed, not text; decompress it first (gunzip)")):
        if content is not None:
            (tmp_path / name).write_text(content)
        proc = launcher("predict", str(run / "model"), "--input", str(tmp_path / name))
        assert (proc.returncode, proc.stderr.strip()) == (2, f"error: --input: {tmp_path / name}: {said}")
    (tmp_path / "words.txt").write_text("text, images and posts you share remain yours.\n")  # a clause, not a header
    assert json.loads(check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "words.txt"))).stdout)["line"] == 1
    # A text longer than the model reads is scored on its start, and counted (it was without a word).
    (tmp_path / "long.txt").write_text(" ".join([texts[0]] * 60) + "\n" + texts[1] + "\n")
    long = check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "long.txt")))
    limit = json.loads((run / "model" / "launcher.json").read_text())["max_length"]
    assert long.stderr.strip() == (f"note: 1 of 2 texts were longer than {limit} tokens (the training max_length): each "
                                   f"was scored on its first {limit}")
    assert "longer than" not in check(launcher("predict", str(run / "model"), "--input", str(clauses))).stderr
    # eval on a file: a class no row has is said (an all-fair file scored macro-F1 0.5 without a
    # word); its hints name no training setting, which an export does not take; a short CSV row,
    # a byte that is not UTF-8 and a pipe are named as what they are.
    fair = tmp_path / "fair.jsonl"
    fair.write_text("".join(json.dumps({"text": t, "label": "fair"}) + "\n" for t in texts))
    fair_eval = check(launcher("eval", str(run / "model"), "--data", str(fair)))
    assert fair_eval.stderr.strip() == f"note: no row of {fair} has 'unfair': an F1 of 0 for each counts in the macro-F1"
    assert json.loads(fair_eval.stdout)["f1/unfair"] == 0
    assert "note:" not in check(launcher("eval", str(run / "model"), "--data", str(run / "data" / "validation.jsonl"))).stderr
    # A short row lacking only a column the model does not read is predicted, as training reads it.
    (tmp_path / "ids.csv").write_text("text,id\nWe may end it.,7\nWe may not.\n")
    short = [json.loads(x) for x in check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "ids.csv"))).stdout.splitlines()]
    assert [(p["text"], p["id"]) for p in short] == [("We may end it.", "7"), ("We may not.", None)]
    (tmp_path / "Cap.csv").write_text("Text,Label\nWe may end it.,unfair\n")
    (tmp_path / "odd.csv").write_text("text,label\nWe may end it.,maybe\nWe may not.\n")
    (tmp_path / "lat.csv").write_bytes(b"text,label\nWe may end it.,unfair\nWe may n\xf6t.,fair\n")
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    for data, said in ((tmp_path / "Cap.csv", [f"{tmp_path / 'Cap.csv'}: no 'text' and no 'label' or 'labels' column (its "
                                               "columns: 'Text', 'Label'); rename the file's columns: an exported model reads "
                                               "the columns it was trained on"]),
                       (tmp_path / "odd.csv", [f"{tmp_path / 'odd.csv'}:2: 'label' must be 0, 1, fair or unfair, or an "
                                               "UNFAIR-ToS category name; got 'maybe'",
                                               f"{tmp_path / 'odd.csv'}:3: 1 field where the header names 2"]),
                       (tmp_path / "lat.csv", [f"{tmp_path / 'lat.csv'}:3: not valid UTF-8 (byte 9 of the line)"]),
                       (fifo, [f"--data: {fifo}: not a regular file (a pipe?); give a JSONL, CSV or Parquet file"])):
        proc = launcher("eval", str(run / "model"), "--data", str(data))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert [x.removeprefix("error: ") for x in proc.stderr.splitlines() if x.startswith("error:")] == said
    # The output is written whole at the end, with the umask's mode (not a temporary file's 0600).
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask and not list(tmp_path.glob(".pred.jsonl.*"))
    # Read by `head`, which leaves after one line: no BrokenPipeError traceback, the exit of a
    # tool SIGPIPE ended (141), as a shell's pipefail expects.
    many = tmp_path / "many.txt"
    many.write_text("We may terminate your account at any time without notice.\n" * 3000)  # more than a pipe holds
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m launcher predict {run / 'model'} "
                            f"--input {many} | head -1"], capture_output=True, text=True)
    assert piped.returncode == 141 and "Traceback" not in piped.stderr, piped.stderr[-2000:]
    assert json.loads(piped.stdout)["label"] == "unfair"
    # A broken pipe that is not stdout's is not hidden as one.
    from launcher import cli

    def broken(args):
        raise BrokenPipeError("a socket")

    cli.COMMANDS["env"], env = broken, cli.COMMANDS["env"]
    try:
        with pytest.raises(BrokenPipeError):
            cli.main(["env"])
    finally:
        cli.COMMANDS["env"] = env
    # --output onto a link replaces the file it leads to, keeping the link and the file's mode;
    # onto something that is not a file (/dev/null), writes into it.
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    os.chmod(real, 0o640)
    link.symlink_to(real)
    check(launcher("predict", str(run / "model"), "--input", str(clauses), "--output", str(link)))
    assert link.is_symlink() and real.stat().st_mode & 0o777 == 0o640
    assert [json.loads(l)["label"] for l in real.read_text().splitlines()] == ["unfair", "fair"]
    check(launcher("predict", str(run / "model"), "--input", str(clauses), "--output", os.devnull))
    assert Path(os.devnull).is_char_device()


def _weights(run: Path) -> dict:
    return load_file(run / "model" / "model.safetensors")


def test_resume_equals_uninterrupted(tmp_path):
    """2N steps straight vs N, interrupt, resume to 2N (N=12, an epoch boundary inside).

    On one CPU process the resumed run replays the same ops in the same order (data
    order and dropout are functions of seed and step), so weights should agree to the
    last bit; 1e-6 absolute allows only for float non-associativity across thread
    schedules, far below what one differing step would change (lr 1e-3 moves weights
    by ~1e-3 per step)."""
    common = [*FAST, "train.max_steps=24", "checkpoint.every_steps=6", "eval.every_steps=6", "train.warmup_steps=3"]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "a"), "--run-name", "r", *common))
    first = check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--run-name", "r", *common, "train.halt_at_step=12"))
    assert "stopped at step 12 (train.halt_at_step)" in first.stdout
    assert not (tmp_path / "b" / "r" / "model").exists()
    second = check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--run-name", "r", *common))
    assert "resuming from" in second.stdout and "step-000012" in second.stdout

    a, b = _weights(tmp_path / "a" / "r"), _weights(tmp_path / "b" / "r")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst

    ca, cb = mlflow_client(tmp_path / "a"), mlflow_client(tmp_path / "b")
    (ra,), (rb,) = all_runs(ca), all_runs(cb)
    assert rb.info.status == "FINISHED" and rb.data.tags["launcher.attempts"] == "2"
    hist_b = cb.get_metric_history(rb.info.run_id, "train/loss")
    assert [m.step for m in hist_b] == list(range(1, 25))  # no duplicates, no gaps
    lr_a = [(m.step, m.value) for m in ca.get_metric_history(ra.info.run_id, "train/lr")]
    lr_b = [(m.step, m.value) for m in cb.get_metric_history(rb.info.run_id, "train/lr")]
    assert [s for s, _ in lr_b] == [s for s, _ in lr_a] == list(range(1, 25))
    assert [v for _, v in lr_b] == pytest.approx([v for _, v in lr_a])  # the schedule continued, it did not restart
    assert [m.step for m in cb.get_metric_history(rb.info.run_id, "eval/macro_f1")] == [0, 6, 12, 18, 24]
    loss_a = [m.value for m in ca.get_metric_history(ra.info.run_id, "train/loss")]
    assert [m.value for m in hist_b] == pytest.approx(loss_a, abs=1e-5)

    # Finished: running again does nothing and changes nothing.
    again = check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--run-name", "r", *common))
    assert "already finished at step 24" in again.stdout
    assert "to train on from there, raise train.max_steps; to start again, give another --run-name" \
        in again.stdout.splitlines()
    # A change to a finished run is not recorded: nothing follows it (config.yaml said
    # checkpoint.export: last while model/ stayed the best evaluation's).
    config = (tmp_path / "b" / "r" / "config.yaml").read_text()
    again = check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--run-name", "r", *common,
                           "checkpoint.export=last"))
    assert "checkpoint.export: 'best' -> 'last'" in again.stdout
    assert "already finished at step 24; nothing to do; the changes above are not recorded" in again.stdout
    assert (tmp_path / "b" / "r" / "config.yaml").read_text() == config
    # checkpoint.resume=never refuses to touch an existing run directory.
    before = sorted(str(p) for p in (tmp_path / "b" / "r").rglob("*"))
    never = launcher("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--run-name", "r", *common, "checkpoint.resume=never")
    assert never.returncode == 2
    assert never.stderr.strip().splitlines()[-1].startswith(f"error: run directory {tmp_path / 'b' / 'r'} exists")
    assert sorted(str(p) for p in (tmp_path / "b" / "r").rglob("*")) == before
    assert len(all_runs(cb)) == 1


def test_bad_data_row_and_unreachable_model_create_nothing(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "fine", "label": 0}\n{"text": "broken", "label": "maybe"}\n')
    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path / "o"), "data.synthetic.enabled=false",
                    f"data.train_file={bad}", f"data.validation_file={bad}")
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert err == [f"error: {bad}:2: 'label' must be 0, 1, fair or unfair, or an UNFAIR-ToS category name; got 'maybe'; for your own classes set data.label_names"]
    assert not (tmp_path / "o" / "clause_tiny").exists()

    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path / "o"), "model.name=nlpaueb/legal-bert-base-uncased")
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "model.name: cannot load 'nlpaueb/legal-bert-base-uncased'" in err[0]
    assert "model.name=/path/to/model" in err[0]
    assert not (tmp_path / "o" / "clause_tiny").exists()


def test_multilabel_run_with_wandb_offline(tmp_path):
    """Offline as W&B users ask for it, through WANDB_MODE (no config key: the environment
    decides; an online W&B here would fail to log in), and W&B's other variables hold too:
    WANDB_DIR, WANDB_TAGS, WANDB_RUN_GROUP."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-home"), "WANDB_TAGS": "team-legal,sweep-7",
           "WANDB_RUN_GROUP": "group-tos"}
    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "ml", *FAST,
                          "data.mode=multilabel", "train.class_weighting=balanced", "train.max_steps=12",
                          "eval.every_steps=6", "tracking.wandb=true", env=env))
    assert "f1/Arbitration" in proc.stdout and "f1/none" in proc.stdout
    assert not (tmp_path / "ml" / "wandb").exists()
    runs = list((tmp_path / "wandb-home").glob("wandb/offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "ml").rglob("*"))
    # wandb 0.31 keeps offline history in a binary log with no Python reader; its records
    # hold metric keys as plain protobuf strings, and saved files are copied verbatim.
    (log,) = runs[0].glob("run-*.wandb")
    # Read as soon as the process has ended (it leaves through os._exit after the atexit hooks,
    # wandb's teardown among them): every point of metrics.jsonl is in the file, and the run's
    # exit record closes it, so nothing waits on wandb's service, which a Slurm step's end kills.
    records = wandb_records(log)
    local = [json.loads(line) for line in (tmp_path / "ml" / "metrics.jsonl").read_text().splitlines()]
    points = [(int(float(h["train/global_step"])), sorted(k for k in h if not k.startswith("_") and k != "train/global_step"))
              for h in wandb_rows(records)]
    assert points == [(r["step"], sorted(k for k in r if k != "step")) for r in local]
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0
    data = log.read_bytes()
    for key in (b"train/loss", b"eval/macro_f1", b"eval/f1/Arbitration", b"train.global_batch_size", b"team-legal",
                b"sweep-7", b"group-tos"):
        assert key in data, key
    saved = json.loads((runs[0] / "files" / "final_metrics.json").read_text())
    assert saved == json.loads((tmp_path / "ml" / "final_metrics.json").read_text())
    config = json.loads((tmp_path / "ml" / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and len(config["id2label"]) == 8


def test_a_resumed_wandb_run_stays_in_its_project_and_entity(tmp_path):
    """A W&B run id belongs to its project and entity: resumed with another tracking.wandb_project
    (or another WANDB_ENTITY on the resumed job's machine), the same id started a second run
    there and the history split in two (MLflow's runs stay in their experiment the same way).
    The resume stays and says so; a new run goes to the new ones."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_ENTITY": "team-a"}
    args = ["train", str(TINY), "--output-dir", str(tmp_path), *FAST, "train.max_steps=4", "eval.every_steps=100",
            "checkpoint.every_steps=2", "tracking.wandb=true", "tracking.mlflow=false"]
    check(launcher(*args, "--run-name", "r", "tracking.wandb_project=first", "train.halt_at_step=2", env=env))
    env["WANDB_ENTITY"] = "team-b"
    proc = check(launcher(*args, "--run-name", "r", "tracking.wandb_project=second", env=env))
    check(launcher(*args, "--run-name", "new", "tracking.wandb_project=second", "train.max_steps=1", env=env))

    def started(run: Path) -> tuple[str, str, str]:
        (log,) = run.glob("run-*.wandb")
        (record,) = [r.run for r in wandb_records(log) if r.HasField("run")][:1]
        return record.run_id, record.project, record.entity

    runs = [started(run) for run in sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))]
    assert len(runs) == 3 and runs[0] == runs[1] and runs[0][1:] == ("first", "team-a"), runs
    assert runs[2][1:] == ("second", "team-b"), runs
    assert (f"tracking: W&B run {runs[0][0]} stays in project 'first', where its first attempt started it (project "
            "'second' is where a new run would go)") in proc.stderr.splitlines(), proc.stderr
    assert (f"tracking: W&B run {runs[0][0]} stays with entity 'team-a', where its first attempt started it "
            "(WANDB_ENTITY 'team-b' is where a new run would go)") in proc.stderr.splitlines(), proc.stderr


@pytest.mark.parametrize("inherited", [False, True], ids=["own-service", "inherited-service"])
def test_a_run_killed_mid_run_keeps_its_whole_history_in_wandb(tmp_path, inherited):
    """W&B writes a run's records in blocks and has no flush: an attempt killed with SIGKILL
    (here while it sleeps inside step 8, after the checkpoint at 6) leaves a run file that lacks
    part of what it logged, often all of it. The resumed attempt sends what metrics.jsonl kept
    that the earlier file lacks, so the run's files hold every point of metrics.jsonl; before,
    steps 0-6 could be gone from W&B while MLflow had them.
    inherited: launcher is started by a process that used W&B (its WANDB_SERVICE in the
    environment). Both attempts joined that process's service, where the killed attempt's run
    stayed open: the resumed one stopped with "run ID ... is in use" (seen when a W&B test ran
    in the same test worker before this one)."""

    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb")}
    if inherited:  # a process that used W&B and is still alive, as a notebook would be
        holder = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, wandb\n"
             f"wandb.init(mode='offline', dir={str(tmp_path / 'other')!r}).finish()\n"
             "print(os.environ['WANDB_SERVICE'], flush=True)\nsys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE_ENV})
        env["WANDB_SERVICE"] = holder.stdout.readline().strip()
        if not env["WANDB_SERVICE"]:
            holder.kill()
            pytest.fail("the W&B service of the other process did not start")
    try:
        _killed_and_resumed_in_wandb(tmp_path, env)
    finally:
        if inherited:
            holder.communicate(timeout=120)  # its own run ends as before
    assert not inherited or holder.returncode == 0


def _killed_and_resumed_in_wandb(tmp_path: Path, env: dict) -> None:
    cmd = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST, "train.max_steps=10",
           "eval.every_steps=4", "checkpoint.every_steps=6", "tracking.wandb=true", "tracking.mlflow=false"]
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *cmd], stdout=subprocess.DEVNULL, stderr=sink,
                                env={**os.environ, **OFFLINE_ENV, **env, "LAUNCHER_STALL": "0:8:3600"})
    try:
        deadline = time.time() + 300
        while "LAUNCHER_STALL: rank 0 sleeps 3600 s at 8" not in errors.read_text():
            assert proc.poll() is None and time.time() < deadline, errors.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    (killed,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    before = {_point(row) for row in wandb_rows(wandb_records(killed))}
    resumed = check(launcher(*cmd, env=env))
    assert "resuming from" in resumed.stdout and "step-000006" in resumed.stdout
    local = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # (Seen: the killed file held nothing but its header. wandb also writes about every 30 s:
    # had it written all of steps 0-6 just before the kill, there is nothing to send, and the
    # resumed attempt must then send nothing again.)
    lacked = [_point(r) for r in local if r["step"] <= 6 and _point(r) not in before]
    (again,) = set((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")) - {killed}
    rows = [_point(row) for row in wandb_rows(wandb_records(again))]
    assert rows[:len(lacked)] == lacked  # sent first, in order, then the steps after the checkpoint
    said = f"tracking: {len(lacked)} logged points from metrics.jsonl that the W&B run lacked were sent"
    assert (said in resumed.stdout) == bool(lacked), resumed.stdout
    assert {_point(r) for r in local} <= before | set(rows)
    assert rows[len(lacked):] == [_point(r) for r in local if r["step"] > 6]


_SIXTY = [*FAST, "train.max_steps=60", "checkpoint.every_steps=1000", "eval.every_steps=1000"]


@pytest.fixture(scope="module")
def sixty_steps(tmp_path_factory) -> Path:
    """The uninterrupted 60-step run that a run killed before its first checkpoint and started
    again in place must equal (two tests)."""
    out = tmp_path_factory.mktemp("sixty")
    check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY, *NO_MLFLOW))
    return out / "r"


def test_requeued_job_that_died_before_its_first_checkpoint_starts_again_in_place(tmp_path, sixty_steps):
    """A node dies (SIGKILL) before the first checkpoint; Slurm requeues the job with the same
    job id. The run directory holds no checkpoint, but RUN/job.json says it belongs to this job,
    so the job starts again from step 0 in it, continuing its MLflow run. Another job is still
    refused with exit 2 and changes nothing (the whole policy: test_config.py::test_run_directory_policy)."""
    out, run = tmp_path / "b", tmp_path / "b" / "r"
    cmd = [sys.executable, "-m", "launcher", "train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY]
    proc = subprocess.Popen(cmd, env={**os.environ, "SLURM_JOB_ID": "4711"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Killed once its MLflow run exists (recorded in job.json before step 0's evaluation and 60 steps).
    while not owner.read_owner(run).get("tracker_ids"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list((run / "checkpoints").glob("step-*")), "killed too late: a checkpoint exists"
    job = owner.read_owner(run)
    assert job["slurm_job_id"] == "4711"
    # Another job, while the lease's holder is alive (this process stands in for it; a dead
    # holder's run starts again in place for any launch: the next test)
    lease = (run / owner.LEASE_FILE).read_text()
    (run / owner.LEASE_FILE).write_text(json.dumps({**json.loads(lease), "pid": os.getpid()}))
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    other = launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY, env={"SLURM_JOB_ID": "4712"})
    assert other.returncode == 2 and "holds no complete checkpoint" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    (run / owner.LEASE_FILE).write_text(lease)  # the killed attempt's again
    # the requeue of the same job with the YAML edited meanwhile: refused as another run, or an
    # accepted change listed (the requeue was not compared with the config at all)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    edited = launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY, "train.lr=0.01",
                      env={"SLURM_JOB_ID": "4711"})
    assert edited.returncode == 2 and edited.stderr.strip().splitlines() == [
        f"error: run directory {run} holds no complete checkpoint: its last attempt of job 4711 stopped before its first "
        "checkpoint, with another config (train.lr: 0.001 -> 0.01); pick another --run-name, or remove it to start this "
        "config there"], edited.stderr[-2000:]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before

    again = check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY, "eval.every_steps=900",
                           env={"SLURM_JOB_ID": "4711"}))
    lines = again.stdout.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("restarting from step 0 in place: an earlier attempt of job 4711"))
    assert lines[at + 1 : at + 3] == ["restarting with a changed config (config_history.jsonl):",
                                      "  eval.every_steps: 1000 -> 900"], lines
    a, b = _weights(sixty_steps), _weights(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    (mlrun,) = all_runs(mlflow_client(out))
    assert mlrun.info.run_id == job["tracker_ids"]["mlflow"] and mlrun.data.tags["launcher.attempts"] == "2"
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["slurm_job_id"] == "4711"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == list(range(1, 61))  # the local record holds the new attempt only


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(tmp_path, sixty_steps):
    """kill -9 (a timeout's, the OOM killer's) before the first checkpoint, outside a scheduler:
    the same command refused the directory it left ("holds no complete checkpoint"), which
    held nothing to resume. Its lease names a process of this host that is gone, so the same
    run starts again from step 0 in place, in the same MLflow run, and says so; another
    config under its name is still refused."""
    out, run = tmp_path / "k", tmp_path / "k" / "r"
    cmd = [sys.executable, "-m", "launcher", "train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not owner.read_owner(run).get("tracker_ids"):  # its MLflow run exists
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list((run / "checkpoints").glob("step-*")), "killed too late: a checkpoint exists"
    assert json.loads((run / owner.LEASE_FILE).read_text())["pid"] == proc.pid
    # another run under its name is refused, as before: only the same run starts again there
    other = launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY, "train.lr=0.01")
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: run directory {run} holds no complete checkpoint: its last attempt was killed (pid {proc.pid} on "
        f"{os.uname().nodename}) before its first checkpoint, with another config (train.lr: 0.001 -> 0.01); pick "
        "another --run-name, or remove it to start this config there"], other.stderr
    # with a change a resume accepts: listed, recorded and logged at step 0 (it was applied unsaid,
    # and the MLflow run kept the first attempt's value)
    again = check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "r", *_SIXTY, "eval.every_steps=900",
                           env={"SLURM_JOB_ID": ""}))
    lines = again.stdout.splitlines()
    at = lines.index(f"restarting from step 0 in place: the last attempt was killed (pid {proc.pid} on "
                     f"{os.uname().nodename}) before its first checkpoint")
    assert lines[at + 1 : at + 3] == ["restarting with a changed config (config_history.jsonl):",
                                      "  eval.every_steps: 1000 -> 900"]
    (history,) = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history["resumed_at_step"] == 0 and history["changed"] == {"eval.every_steps": [1000, 900]}
    a, b = _weights(sixty_steps), _weights(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    (mlrun,) = all_runs(mlflow_client(out))
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["launcher.attempts"] == "2"
    # (the killed attempt may have died before its params were sent: then the restart's are the first)
    assert mlrun.data.params["resumed_at_0.eval.every_steps"] == "1000 -> 900"
    assert tracking._current(mlrun.data.params, "eval.every_steps") == "900"


def test_early_stopping_under_bf16(tmp_path):
    """With a learning rate too small to change any prediction, macro-F1 cannot improve
    after the first in-loop eval (step 2), so patience 1 stops the run at step 4: it is
    checkpointed and exported there, and the MLflow run ends FINISHED at step 4."""
    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "es", *FAST,
                          "train.precision=bf16", "train.lr=1e-9", "train.max_steps=24", "eval.every_steps=2",
                          "eval.early_stopping_patience=1", "checkpoint.every_steps=100"))
    assert "early stop at step 4" in proc.stdout
    run = tmp_path / "es"
    # The stop step's checkpoint only: the improving eval's weights were kept as a weights-only
    # snapshot (RUN/best), which became model/.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004"]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["exported_step"] == 2 and "exporting the best evaluation's weights: step 2" in proc.stdout
    # The end's table sets step 0 beside the exported step's evaluation, and names it (it said
    # "final", which read as the last step's)
    head = next(line for line in proc.stdout.splitlines() if line.startswith("metric "))
    assert head.split() == ["metric", "step", "0", "step", "2", "change"]
    assert not (run / "model" / "best.json").exists()
    exported = _weights(run)
    again = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "es", *FAST,
                           "train.precision=bf16", "train.lr=1e-9", "train.max_steps=24", "eval.every_steps=2",
                           "eval.early_stopping_patience=1", "checkpoint.every_steps=100"))
    assert "already finished at step 4" in again.stdout  # an early stop is an end: model/ stays the best's
    assert "to train on from there, raise eval.early_stopping_patience; to start again, give another --run-name" \
        in again.stdout.splitlines()
    assert all(torch.equal(exported[k], v) for k, v in _weights(run).items())
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["evals_without_improvement"] == 1 and state["best_step"] == 2
    assert (run / "model" / "model.safetensors").is_file()
    client = mlflow_client(tmp_path)
    (r,) = all_runs(client)
    assert r.info.status == "FINISHED"
    assert r.data.params["train.precision"] == "bf16"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "eval/macro_f1")] == [0, 2, 4]
    # More patience continues the run; nothing beats step 2, whose snapshot is exported again.
    more = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "es", *FAST,
                          "train.precision=bf16", "train.lr=1e-9", "train.max_steps=24", "eval.every_steps=2",
                          "eval.early_stopping_patience=2", "checkpoint.every_steps=100"))
    assert "early stop at step 6" in more.stdout and "exporting the best evaluation's weights: step 2" in more.stdout
    assert all(torch.equal(exported[k], v) for k, v in _weights(run).items())


def test_export_cli_turns_a_checkpoint_into_the_same_model(trained_binary, tmp_path):
    _, run = trained_binary
    ckpt = exported_checkpoint(run)
    out = tmp_path / "exported"
    (tmp_path / "exported.tmp").mkdir()  # a user's own, beside OUT_DIR: it was removed unasked
    (tmp_path / "exported.tmp" / "notes.txt").write_text("mine")
    (tmp_path / ".exported.export-k1ll3d").mkdir()  # what a killed export of it left
    skeleton_mode = (ckpt / "skeleton").stat().st_mode
    os.chmod(ckpt / "skeleton", 0o700)  # the copied skeleton's mode is not OUT_DIR's
    try:
        proc = check(launcher("export", str(ckpt), str(out)))
    finally:
        os.chmod(ckpt / "skeleton", skeleton_mode)
    assert (tmp_path / "exported.tmp" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")) == []  # no temporary left
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # the umask's mode, not a temporary directory's 0700
    assert "model.safetensors" in proc.stdout  # read from Accelerate's single-process state
    exported, final = load_file(out / "model.safetensors"), _weights(run)
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    for name in ("config.json", "tokenizer.json", "launcher.json"):
        assert (out / name).is_file()
    # One record: what the checkpoint kept is what the run's own export says (labels, dtype, precision).
    ran, kept = (json.loads((d / "launcher.json").read_text()) for d in (run / "model", out))
    assert {"export_dtype", "precision", "labels"} <= ran.keys() and kept.items() >= ran.items()
    # Never overwrite, never read a half-written checkpoint: exit 2, one line, nothing touched.
    lines = proc.stdout.strip().splitlines()  # one line: DeepSpeed's "unable to detect" a GPU printed first
    assert len(lines) == 1 and lines[0].startswith(f"{out}: Hugging Face model from"), lines
    again = launcher("export", str(ckpt), str(out))
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out}: already exists; choose a new output directory"
    # Given the run directory or its checkpoints/ folder: the checkpoint to give is named.
    latest = max((p for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()), key=lambda p: int(p.name[5:]))
    for given in (run, run / "checkpoints"):
        wrong = launcher("export", str(given), str(tmp_path / "y"))
        assert wrong.returncode == 2 and wrong.stderr.strip() == (
            f"error: {given}: not a complete checkpoint (no COMPLETE marker); its latest complete checkpoint is {latest}")
    partial = tmp_path / "step-000007"
    partial.mkdir()
    bad = launcher("export", str(partial), str(tmp_path / "x"))
    assert bad.returncode == 2 and "not a complete checkpoint (no COMPLETE marker)" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_a_logging_window_reports_the_mean_loss_of_its_steps(tmp_path):
    """tracking.log_every_steps=4: train/loss at step 4 and 8 is the mean of the four steps'
    losses a run logging every step records (the steps themselves are the same). A run halted
    at step 6 logs steps 5-6 as a window of their own (they were lost), and its resume 7-8."""
    common = [*FAST, "train.max_steps=8", "eval.every_steps=1000", "eval.at_start=false", "checkpoint.every_steps=1000"]
    losses = {}
    for every in (1, 4, "halted"):
        args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", f"w{every}", *common,
                f"tracking.log_every_steps={4 if every == 'halted' else every}", "tracking.mlflow=false"]
        if every == "halted":
            check(launcher(*args, "train.halt_at_step=6"))
        check(launcher(*args))
        records = [json.loads(x) for x in (tmp_path / f"w{every}" / "metrics.jsonl").read_text().splitlines()]
        losses[every] = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert sorted(losses[4]) == [4, 8]
    for end in (4, 8):
        assert losses[4][end] == pytest.approx(sum(losses[1][s] for s in range(end - 3, end + 1)) / 4, rel=1e-6)
    assert sorted(losses["halted"]) == [4, 6, 8] and losses["halted"][4] == losses[4][4]
    for start, end in ((5, 6), (7, 8)):
        assert losses["halted"][end] == pytest.approx(sum(losses[1][s] for s in range(start, end + 1)) / 2, rel=1e-6)


def test_a_logged_step_time_leaves_out_the_evaluation_before_it_and_epochs_count_completed(tmp_path):
    """An evaluation stalled 6 s (LAUNCHER_STALL) after step 3: step 4's logged time is the
    step's alone (it held the evaluation, 6 s and more, and its tokens/s fell with it).
    train/epoch is epochs completed: step 6 of 12 per epoch is 0.5 (it was the 0-based
    epoch index, 0 until step 12)."""
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "t", *FAST, "train.max_steps=6",
                   "eval.every_steps=3", "eval.at_start=false", "checkpoint.every_steps=1000", "tracking.log_every_steps=1",
                   "tracking.mlflow=false", env={"LAUNCHER_STALL": "0:eval:6"}))
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "t" / "metrics.jsonl").read_text().splitlines())
               if "train/step_time_s" in r}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[4]["train/step_time_s"] < 6
    assert [records[s]["train/epoch"] for s in range(1, 7)] == [round(s / 12, 6) for s in range(1, 7)]


def test_export_dtype_is_the_same_from_the_run_and_from_launcher_export(tmp_path):
    """checkpoint.export_dtype=bfloat16 on an fp32 run: model/ holds bf16 weights and says so,
    and `launcher export` of the exported step's checkpoint writes the same tensors."""
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "b", *FAST, "train.max_steps=4",
                   "eval.every_steps=2", "checkpoint.every_steps=2", "checkpoint.export=last",
                   "checkpoint.export_dtype=bfloat16"))
    run = tmp_path / "b"
    online = _weights(run)
    assert {v.dtype for v in online.values()} == {torch.bfloat16}
    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((run / "model" / "launcher.json").read_text())["export_dtype"] == "bfloat16"
    proc = check(launcher("export", str(run / "checkpoints" / "step-000004"), str(tmp_path / "offline")))
    assert "exported in bfloat16" in proc.stdout
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert offline.keys() == online.keys() and all(torch.equal(offline[k], online[k]) for k in online)


def test_a_resume_by_path_into_a_directory_with_that_step_or_later_is_refused(tmp_path):
    """checkpoint.resume=PATH of step 2 into a run directory that holds step 4 (another
    history): its saves would meet those checkpoints and rotation would keep theirs. One line;
    the run directory's own latest checkpoint, named by path, resumes."""
    from launcher.checkpoint import MARKER, STATE_FILE, ConfigError, resolve_resume

    def ckpt(path: Path, step: int) -> Path:
        path.mkdir(parents=True)
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
        (path / MARKER).write_text("{}")
        return path

    run = tmp_path / "run"
    own = ckpt(run / "checkpoints" / "step-000004", 4)
    elsewhere = ckpt(tmp_path / "other" / "step-000002", 2)
    with pytest.raises(ConfigError, match=r"is step 2, but .* already holds step-000004, of another history"):
        resolve_resume(run, str(elsewhere), trusted=True)
    assert resolve_resume(run, str(own)).checkpoint == own
    assert resolve_resume(tmp_path / "fresh", str(elsewhere), trusted=True).checkpoint == elsewhere
    # Back to one of its own before a later one: the same history, written over (it said "another history")
    back = ckpt(run / "checkpoints" / "step-000002", 2)
    with pytest.raises(ConfigError, match=r"is step 2, but .* already holds step-000004, written after it: going back "
                                          r"would write over them; resume into another --run-name, or remove those"):
        resolve_resume(run, str(back))


def test_mlflow_turned_on_at_a_resume_holds_the_history_before_it(tmp_path):
    """The MLflow run a resume created (tracking.mlflow was false before) held only the steps
    after the resume: metrics.jsonl's earlier values are sent to it, as to a run whose
    tracking.uri changed."""
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *FAST, "train.max_steps=4",
            "eval.every_steps=2", "checkpoint.every_steps=2"]
    check(launcher(*args, "train.halt_at_step=2", "tracking.mlflow=false"))
    check(launcher(*args))
    (run,) = all_runs(mlflow_client(tmp_path))
    client = mlflow_client(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/macro_f1")] == [0, 2, 4]


def test_changes_of_an_attempt_run_with_mlflow_off_reach_the_run_later(tmp_path):
    """An attempt run with tracking.mlflow=false logged none of its changes, and the next attempt
    logged only its own: the MLflow run never showed that eval.every_steps had changed at step 2
    and still read 2 as its current value. The attempts' changes in config_history.jsonl are sent.

    The checkpoint's tracker ids were once replaced by the attempt's own: the attempt with
    tracking.mlflow=false dropped the MLflow run id, so turning MLflow back on started a second
    run. Now the ids merge: the third attempt continues the first attempt's run, and the steps of
    the attempt without MLflow are sent from metrics.jsonl."""
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *FAST, "train.max_steps=4",
            "checkpoint.every_steps=1"]
    check(launcher(*args, "eval.every_steps=2", "train.halt_at_step=2"))
    (first,) = all_runs(mlflow_client(tmp_path))
    check(launcher(*args, "eval.every_steps=3", "train.halt_at_step=3", "tracking.mlflow=false"))
    check(launcher(*args, "eval.every_steps=3"))
    history = [json.loads(line) for line in (tmp_path / "x" / "config_history.jsonl").read_text().splitlines()]
    assert [h["resumed_at_step"] for h in history] == [2, 3]
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.run_id == first.info.run_id and run.data.tags["launcher.attempts"] == "2"
    assert [m.step for m in mlflow_client(tmp_path).get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    params = run.data.params
    assert params["resumed_at_2.eval.every_steps"] == "2 -> 3" and params["resumed_at_2.tracking.mlflow"] == "True -> False"
    assert params["resumed_at_3.tracking.mlflow"] == "False -> True" and params["eval.every_steps"] == "2"
    from launcher.tracking import _current

    assert _current(params, "eval.every_steps") == "3"


def test_the_training_file_given_as_validation_is_said(tmp_path):
    """data.validation_file the same file as data.train_file (by a link, too) was accepted
    without a word: every figure the run reports then scores rows it trained on."""
    check(launcher("synth", str(tmp_path / "d"), "--n-train", "384", "--n-validation", "100"))
    train = tmp_path / "d" / "train.jsonl"
    (tmp_path / "link.jsonl").symlink_to(train)
    args = ["train", str(TINY), "--output-dir", str(tmp_path), *FAST, "data.synthetic.enabled=false", f"data.train_file={train}",
            "train.max_steps=1", "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=0", "tracking.mlflow=false"]
    note = (f"note: data.validation_file is data.train_file ({train}): the evaluations score rows the model trains on, "
            "which says little of how it does on new ones")
    assert note in check(launcher(*args, "--run-name", "same", f"data.validation_file={tmp_path / 'link.jsonl'}")).stdout.splitlines()
    other = check(launcher(*args, "--run-name", "other", f"data.validation_file={tmp_path / 'd' / 'validation.jsonl'}"))
    assert "note: data.validation_file is data.train_file" not in other.stdout


def test_a_resume_given_fewer_steps_than_its_checkpoint_says_where_it_ends(tmp_path):
    """Halted at step 4 and resumed with train.max_steps=3: the start line said "3 steps" and
    the run then exported step 4 without a word. It says so now, and ends where it said."""
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *FAST, "eval.every_steps=100",
            "checkpoint.every_steps=2", "tracking.mlflow=false"]
    check(launcher(*args, "train.max_steps=6", "train.halt_at_step=4"))
    out = check(launcher(*args, "train.max_steps=3")).stdout.splitlines()
    assert ("note: the checkpoint is at step 4, past the 3 step(s) train.max_steps now gives: nothing more trains; "
            "the run ends at step 4") in out, out
    assert "exported:    step 4 of 4 (checkpoint.export: best)" in out
    final = json.loads((tmp_path / "x" / "final_metrics.json").read_text())
    assert (final["step"], final["exported_step"]) == (4, 4)


def test_a_resume_that_goes_back_and_changes_the_values_sends_them_again_and_goes_on(tmp_path):
    """Gone back to step 2 with a new lr (checkpoint.resume_changed=allow): steps 3-4 train
    anew. The MLflow run skipped every step it already had, assuming the same values, so it
    kept the abandoned history's while metrics.jsonl and the export held the new one. Halted
    at step 3, the same command again was refused: step-3 counted as another history's."""
    import shutil

    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *FAST, "train.max_steps=4",
            "eval.every_steps=2", "checkpoint.every_steps=2"]
    check(launcher(*args, "train.halt_at_step=4"))
    ckpts = tmp_path / "x" / "checkpoints"
    shutil.rmtree(ckpts / "step-000004")
    back = [f"checkpoint.resume={ckpts / 'step-000002'}", "train.lr=0.05", "checkpoint.resume_changed=allow"]
    check(launcher(*args, *back, "train.halt_at_step=3"))
    # The same command again (a requeue) goes on with this history's step-3, which it refused
    # as "another history's" checkpoint.
    proc = check(launcher(*args, *back))
    assert f"resuming from {ckpts / 'step-000003'}" in proc.stdout.splitlines()
    jsonl: dict = {}
    for r in map(json.loads, (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()):
        jsonl.setdefault(r["step"], {}).update(r)
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)
    for name in ("train/loss", "train/lr", "eval/loss"):
        history = client.get_metric_history(run.info.run_id, name)
        for step in (3, 4) if name.startswith("train/") else (4,):
            newest = max((m for m in history if m.step == step), key=lambda m: m.timestamp)
            assert newest.value == pytest.approx(jsonl[step][name], rel=1e-6), (name, step)
    assert run.data.metrics["train/lr"] == pytest.approx(jsonl[4]["train/lr"], rel=1e-6)


def test_a_data_file_changed_in_place_is_refused_at_the_resume(tmp_path):
    """The same data.train_file, rows appended after the checkpoint: the resume went on
    silently, every later batch drawn from another epoch order. One line now; allowed, it
    goes on with the new rows, on the schedule of their steps from the next step, and says so
    (it went on at the old schedule's lr for one step, then jumped, silently)."""
    check(launcher("synth", str(tmp_path / "d"), "--n-train", "384", "--n-validation", "100"))
    train = tmp_path / "d" / "train.jsonl"
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *FAST, "data.synthetic.enabled=false",
            f"data.train_file={train}", f"data.validation_file={tmp_path / 'd' / 'validation.jsonl'}",
            "train.epochs=1", "train.warmup_ratio=0", "eval.every_steps=0", "eval.at_start=false",
            "checkpoint.every_steps=2", "tracking.mlflow=false"]  # one epoch: 12 steps of 32 rows
    # Stopped at step 1 by the stop file, made while rank 0 sleeps in that step: the resume's config is the same.
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        first = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=sink,
                                 text=True, env={**os.environ, **OFFLINE_ENV, "LAUNCHER_STOP_FILE": str(tmp_path / "stop"),
                                                 "LAUNCHER_STALL": "0:1:8"})
    deadline = time.time() + 300
    while "LAUNCHER_STALL: rank 0 sleeps" not in errors.read_text():
        assert first.poll() is None and time.time() < deadline, errors.read_text()[-3000:]
        time.sleep(0.05)
    (tmp_path / "stop").touch()
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "stopped at step 1 (stop file" in out, (out[-2000:], errors.read_text()[-2000:])
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines + lines[:64]))
    proc = launcher(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0] == (f"error: data.train_file: {train} gives 448 training examples now and gave 384 when step-000001 "
                         "was written: it changed in place, and the resumed epochs would skip or repeat rows; restore "
                         "it, or set checkpoint.resume_changed=allow to go on with the new rows")
    assert not (tmp_path / "x" / "model").exists()
    # The validation file changed in place was not checked: later evaluations scored other rows
    # than the earlier ones they are compared with.
    train.write_text("".join(lines))
    validation = tmp_path / "d" / "validation.jsonl"
    kept = validation.read_text()
    validation.write_text("".join(kept.splitlines(keepends=True)[:80]))
    proc = launcher(*args)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        f"error: data.validation_file: {validation} gives 80 validation rows now and gave 100 when step-000001 was "
        "written: it changed in place, and later evaluations would be compared with earlier ones on other rows (the best "
        "checkpoint, early stopping); restore it, or set checkpoint.resume_changed=allow to go on with the new rows"), proc.stderr
    assert not (tmp_path / "x" / "model").exists()
    validation.write_text(kept)
    train.write_text("".join(lines + lines[:64]))
    allowed = check(launcher(*args, "checkpoint.resume_changed=allow"))
    assert (tmp_path / "x" / "model").is_dir()
    rows = [json.loads(x) for x in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    assert max(lrs) == 14  # 448 rows: 14 steps
    assert "resuming with a changed config" not in allowed.stdout  # (the same config: only the rows moved)
    said = next(line for line in allowed.stdout.splitlines() if line.startswith("learning rate: step 2 runs at "))
    assert said.startswith(f"learning rate: step 2 runs at {lrs[2]:.3g} on the new 14-step linear schedule (the checkpoint's")
    # step 1 ran at the peak; step 2 (after 1) at 13/14 of it, where the 12-step schedule had 11/12
    assert lrs[2] == pytest.approx(lrs[1] * 13 / 14, rel=1e-5) and lrs[3] == pytest.approx(lrs[1] * 12 / 14, rel=1e-5)


def test_an_extended_run_keeps_its_best_evaluation_from_the_last_step_before(tmp_path):
    """The only evaluation of a 4-step run is its last step, so the best is the live weights and
    no snapshot is taken. Extended to 8 steps without evaluations (and without keeping that
    checkpoint), checkpoint.export: best must still export step 4: the resume snapshots the
    weights it loaded, before a later checkpoint rotates their checkpoint away. The extension
    runs at a learning rate of 0.5, so its final evaluation loss is far worse than step 4's
    whatever the draw (a tiny model's macro-F1 after 4 steps can be beaten by chance)."""
    args = [*FAST, "eval.every_steps=4", "checkpoint.every_steps=4", "checkpoint.keep_last=1", "checkpoint.keep_best=false",
            "tracking.mlflow=false", "eval.metric=loss"]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *args, "train.max_steps=4"))
    run = tmp_path / "x"
    first = _weights(run)
    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "x", *args, "train.max_steps=8",
                          "eval.every_steps=0", "train.lr=0.5", "checkpoint.resume_changed=allow"))
    assert "exporting the best evaluation's weights: step 4" in proc.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000008"]
    assert all(torch.equal(first[k], v) for k, v in _weights(run).items())


def test_an_export_cast_keeps_tied_weights_one_tensor():
    """checkpoint.export_dtype casts the gathered weights; a tied embedding and head (SmolLM2
    ties them) must stay one tensor, which save_pretrained then writes once."""
    from launcher.checkpoint import cast_floats

    emb = torch.randn(8, 4)
    out = cast_floats({"embed.weight": emb, "lm_head.weight": emb, "other": emb.clone(), "ids": torch.arange(3)}, "bfloat16")
    assert out["embed.weight"].dtype == torch.bfloat16 and out["embed.weight"] is out["lm_head.weight"]
    assert out["other"] is not out["embed.weight"] and torch.equal(out["other"], out["embed.weight"])
    assert out["ids"].dtype == torch.int64 and emb.dtype == torch.float32  # the live tensor is not cast


def test_export_reads_the_fsdp_sharded_checkpoint_format(trained_binary, tmp_path):
    """FSDP cannot run on CPU under accelerate (see README), so FSDP itself is not run here.
    This pins the reader to the format: accelerate saves FSDP's SHARDED_STATE_DICT as
    torch.distributed.checkpoint.save({"model": state_dict}) into pytorch_model_fsdp_0/."""
    import shutil

    import torch.distributed.checkpoint as dcp

    _, run = trained_binary
    ckpt = tmp_path / "step-000100"
    shutil.copytree(run / "checkpoints" / "step-000100" / "skeleton", ckpt / "skeleton")
    final = _weights(run)
    dcp.save({"model": final}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    (ckpt / "COMPLETE").write_text("")
    out = tmp_path / "exported"
    # Made by hand, so unsigned: its DCP metadata is a pickle, read only when trusted.
    refused = launcher("export", str(ckpt), str(out))
    assert refused.returncode == 2 and "pytorch_model_fsdp_0/.metadata, which can run any code" in refused.stderr
    proc = check(launcher("export", str(ckpt), str(out), "--trust-checkpoint"))
    assert "FSDP sharded state dict" in proc.stdout
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.parametrize("lora", [False, True])
def test_export_best_holds_the_best_evaluation_and_last_the_final_weights(tmp_path, lora):
    """A learning rate that overshoots: macro-F1 peaks early. model/ holds that evaluation's
    weights (launcher eval reproduces its metrics), kept as a weights-only snapshot when it
    improved (no full checkpoint of that step is written); checkpoint.export=last the final
    ones. Snapshots leave training alone (a LoRA snapshot merges on a copy): both runs end
    with the same last checkpoint."""
    args = [*FAST, *NO_MLFLOW, "train.lr=0.05", "train.max_steps=12", "eval.every_steps=2", "checkpoint.every_steps=0",
            "checkpoint.keep_last=1", *(["model.lora.enabled=true", "train.lr=0.2"] if lora else [])]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "best", *args))
    run = tmp_path / "best"
    final = json.loads((run / "final_metrics.json").read_text())
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval/macro_f1"' in x]
    evals = {r["step"]: r["eval/macro_f1"] for r in history if r["step"] > 0}
    best_step = max(sorted(evals), key=lambda s: (evals[s], -s))
    assert final["exported_step"] == best_step and final["after"]["macro_f1"] == evals[best_step]
    fresh = json.loads(check(launcher("eval", str(run / "model"), "--data", str(run / "data" / "validation.jsonl"))).stdout)
    assert fresh["macro_f1"] == evals[best_step] and fresh["loss"] == pytest.approx(final["after"]["loss"], abs=1e-5)
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "last", *args, "checkpoint.export=last"))
    last = json.loads((tmp_path / "last" / "final_metrics.json").read_text())
    assert last["exported_step"] == 12 and last["after"] == last["last"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000012"]
    ends = [load_file(r / "checkpoints" / "step-000012" / "model.safetensors") for r in (run, tmp_path / "last")]
    assert ends[0].keys() == ends[1].keys() and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    assert best_step != 12  # the two exports differ
    assert _weights(run).keys() == _weights(tmp_path / "last").keys()
    assert any(not torch.equal(_weights(run)[k], _weights(tmp_path / "last")[k]) for k in _weights(run))


def test_eval_scores_with_the_training_max_length_the_export_recorded(tmp_path):
    """Trained with data.max_length=12 (most generated clauses are longer): `launcher eval`
    without --max-length reproduces the run's final eval; --max-length 64 sees longer inputs
    and scores differently, so the default is not an accident.

    With class weights the evaluation loss is the training objective's: torch's class-weighted
    mean, the run's and `launcher eval`'s alike (the export records the weights)."""
    from launcher.data.clauses import LabelEncoder, parse_rows, read_records
    from launcher.tasks import classification

    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "short", "data.max_length=12",
                   "train.max_steps=60", "eval.every_steps=30", "checkpoint.every_steps=30", "checkpoint.export=last",
                   "data.synthetic.n_validation=100", "train.class_weighting=balanced"))
    run = tmp_path / "short"
    meta = json.loads((run / "model" / "launcher.json").read_text())
    assert meta["max_length"] == 12
    final = json.loads((run / "final_metrics.json").read_text())["after"]
    data = str(run / "data" / "validation.jsonl")
    same = json.loads(check(launcher("eval", str(run / "model"), "--data", data)).stdout.strip().splitlines()[-1])
    assert same["loss"] == pytest.approx(final["loss"], rel=1e-5)
    model, tok, names, _, _ = classification.load_exported(run / "model")
    texts, targets = parse_rows(read_records(Path(data)), LabelEncoder("binary", names), data)
    logits = classification.batched_logits(model, tok, texts)
    weights = torch.tensor(meta["class_weights"])
    assert len(set(meta["class_weights"])) == 2  # the generated clauses are not balanced: the weights matter
    by_hand = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), weight=weights)
    assert final["loss"] == pytest.approx(float(by_hand), rel=1e-5)
    unweighted = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))
    assert abs(float(unweighted) - final["loss"]) > 1e-3  # another definition would show
    table = json.loads((run / "model" / "config.json").read_text())["max_position_embeddings"]
    assert table > 12
    longer = json.loads(check(launcher("eval", str(run / "model"), "--data", data, "--max-length", str(table))).stdout.strip().splitlines()[-1])
    assert abs(longer["loss"] - final["loss"]) > 1e-4, (longer, final)  # 50x the tolerance above
    # past the position table: refused, not cut to the table without a word (64 scored as 16 did)
    said = f"error: --max-length: {table + 1} is more tokens than the model has positions for ({table}); give {table} or less"
    for command in (["eval", str(run / "model"), "--data", data], ["predict", str(run / "model"), "--input", data]):
        proc = launcher(*command, "--max-length", str(table + 1))
        assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, said), proc.stderr[-2000:]  # after the load's progress
        assert "Traceback" not in proc.stderr
        # No longer than [CLS] [SEP]: the tokenizer cut nothing then (1 scored whole texts, 2 all alike).
        for short in (1, 2):
            proc = launcher(*command, "--max-length", str(short))
            assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, f"error: --max-length: {short} leaves no "
                                                                               "room for text (the tokenizer adds 2 tokens "
                                                                               "of its own); give more than 2")
    assert check(launcher("eval", str(run / "model"), "--data", data, "--max-length", "3")).returncode == 0
    # fp16 on a CPU is refused before anything is said about figures it never made; generate
    # names a missing directory, and on a classifier says where its answers are.
    proc = launcher("eval", str(run / "model"), "--data", data, "--precision", "fp16")
    assert proc.returncode == 2 and "note:" not in proc.stderr and "fp16 needs a GPU" in proc.stderr
    proc = launcher("generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert (proc.returncode, proc.stderr.strip()) == (2, f"error: {tmp_path / 'nope'}: no such model directory")
    proc = launcher("generate", str(run / "model"), "--prompt", "hi")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("a classifier answers through launcher predict")


def test_off_a_terminal_progress_is_plain_lines_with_loss_lr_and_eta(tmp_path):
    """Under Slurm or nohup there is no bar: plain lines carry the step's numbers, at most every
    tracking.print_every_s, and always the last step's; 0 turns them off."""
    import re

    common = ["train", str(TINY), "--output-dir", str(tmp_path), *FAST, "train.max_steps=6", "eval.every_steps=0"]
    proc = check(launcher(*common, "--run-name", "often", "tracking.print_every_s=0.000001"))
    lines = [line for line in proc.stdout.splitlines() if re.match(r"step \d+/6 ", line)]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]
    pattern = r"step \d/6 \(\d+%\)  loss=\d\.\d{4}  lr=\d\.\de[+-]\d\d  tok_s=[\d,]+  eta \d+m\d\ds"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[-1].startswith("step 6/6 (100%)") and lines[-1].endswith("eta 0m00s")
    records = [json.loads(x) for x in (tmp_path / "often" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert [f"loss={losses[s]:.4f}" in line for s, line in zip(range(1, 7), lines)] == [True] * 6
    quiet = check(launcher(*common, "--run-name", "quiet", "tracking.print_every_s=0"))
    assert not [line for line in quiet.stdout.splitlines() if re.match(r"step \d+/6 ", line)]
    hourly = check(launcher(*common, "--run-name", "hourly", "tracking.print_every_s=3600"))
    assert [line.split()[1] for line in hourly.stdout.splitlines() if re.match(r"step \d+/6 ", line)] == ["6/6"]


def _linear_lrs(lr: float, warmup: int, total: int) -> dict[int, float]:
    """step -> the lr that step uses on transformers' linear schedule: the schedule's value before
    that step's own scheduler step."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler("linear", opt, warmup, total)
    out = {}
    for step in range(1, total + 1):
        out[step] = opt.param_groups[0]["lr"]
        sched.step()
    return out


def test_a_resume_lists_what_changed_and_refuses_another_run(tmp_path):
    """Halted at 6 of 12. Resuming with another lr would train a run neither config
    describes: one line, exit 2, nothing touched. With checkpoint.resume_changed=allow and
    max_steps 18 the run goes on: the changes are listed, kept in config_history.jsonl,
    config.yaml and the MLflow params, and from step 7 the lr is the new lr's 18-step schedule."""
    from launcher.config import load_config

    common = [*FAST, "checkpoint.every_steps=6", "eval.every_steps=6", "train.warmup_steps=2"]
    run = tmp_path / "r"
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *common]
    check(launcher(*args, "train.max_steps=12", "train.halt_at_step=6"))
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    refused = launcher(*args, "train.max_steps=12", "train.lr=1e-4")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: checkpoint.resume: {run} would resume from step-000006 with train.lr: 0.001 -> 0.0001: that trains a "
        "run neither config describes; restore the values, choose a new --run-name, or set checkpoint.resume_changed=allow")
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    # A change the checkpoint's weights cannot load under is refused even when allowed (the
    # refusal offered allow, which then ended in a size-mismatch traceback): the model's size,
    # LoRA, the tiny model's position table (data.max_length)
    for change in ("model.tiny.hidden_size=64", "model.lora.enabled=true", "data.max_length=96"):
        key, value = change.split("=")
        proc = launcher(*args, "train.max_steps=12", change, "checkpoint.resume_changed=allow")
        assert proc.returncode == 2 and proc.stderr.startswith(
            f"error: checkpoint.resume: {run} would resume from step-000006 with {key}: ") and proc.stderr.strip().endswith(
            f"-> {value if value != 'true' else True}: its weights do not load into this model; restore the values, or "
            "choose a new --run-name") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before

    extended = check(launcher(*args, "train.max_steps=18", "train.lr=1e-4", "checkpoint.resume_changed=allow"))
    lines = extended.stdout.splitlines()
    at = lines.index("resuming with a changed config (config_history.jsonl):")
    assert lines[at + 1 : at + 4] == ["  train.halt_at_step: 6 -> None", "  train.lr: 0.001 -> 0.0001",
                                      "  train.max_steps: 12 -> 18"]
    (history,) = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history["resumed_at_step"] == 6
    assert history["changed"] == {"train.halt_at_step": [6, None], "train.lr": [0.001, 0.0001], "train.max_steps": [12, 18]}
    assert load_config(run / "config.yaml", check_files=False).train.max_steps == 18
    client = mlflow_client(tmp_path)
    (mlrun,) = all_runs(client)
    assert mlrun.data.params["resumed_at_6.train.max_steps"] == "12 -> 18" and mlrun.data.params["train.max_steps"] == "12"
    # What the change moved is there too, at the step it moved; what it did not move is not.
    assert mlrun.data.params["resumed_at_6.derived.total_steps"] == "12 -> 18"
    assert not [k for k in mlrun.data.params if k.startswith("resumed_at_6.derived.") and "total_steps" not in k]
    lrs = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/lr")}
    assert sorted(lrs) == list(range(1, 19))
    expected = _linear_lrs(1e-4, 2, 18)
    assert [lrs[s] for s in range(7, 19)] == pytest.approx([expected[s] for s in range(7, 19)])
    # Another tracking.experiment on resume: the run stays in its own, and says so (an empty
    # experiment of the new name was made, and the export's logged model went there, apart
    # from its run)
    moved = check(launcher(*args, "train.max_steps=20", "train.lr=1e-4", "tracking.experiment=elsewhere"))
    assert (f"tracking: MLflow run {mlrun.info.run_id} stays in experiment 'launcher-demo', where its first attempt "
            "started it (tracking.experiment 'elsewhere' is where a new run would go)") in moved.stderr, moved.stderr[-2000:]
    assert client.get_experiment_by_name("elsewhere") is None
    (again,) = all_runs(client)
    every = [e.experiment_id for e in client.search_experiments()]
    models = client.search_logged_models(experiment_ids=every)
    assert again.info.run_id == mlrun.info.run_id and models
    assert {(m.experiment_id, m.source_run_id) for m in models} == {(mlrun.info.experiment_id, mlrun.info.run_id)}


def test_relative_data_paths_resume_by_the_files_they_name_not_by_their_text(tmp_path):
    """config.yaml kept data.train_file as typed. The same relative names typed in another
    directory, where they are other files of the same length, resumed silently and trained
    and validated on those; an absolute path to the same files as before was refused."""
    from launcher.data import synthetic

    for place, seed in (("a", 0), ("b", 1)):
        synthetic.write_splits(tmp_path / place / "data", 384, 100, seed)
    out = tmp_path / "out"
    args = ["train", str(TINY), "--output-dir", str(out), "--run-name", "r", *FAST, "data.synthetic.enabled=false",
            "checkpoint.every_steps=4", "eval.every_steps=4", "train.max_steps=8"]
    relative = ["data.train_file=data/train.jsonl", "data.validation_file=data/validation.jsonl"]
    check(launcher(*args, *relative, "train.halt_at_step=4", cwd=tmp_path / "a"))
    other = launcher(*args, *relative, cwd=tmp_path / "b")
    assert other.returncode == 2 and other.stderr.strip().startswith(
        f"error: checkpoint.resume: {out / 'r'} would resume from step-000004 with data.train_file: "
        f"'{tmp_path / 'a' / 'data' / 'train.jsonl'}' -> '{tmp_path / 'b' / 'data' / 'train.jsonl'}'"), other.stderr[-2000:]
    same = check(launcher(*args, f"data.train_file={tmp_path / 'a' / 'data' / 'train.jsonl'}",
                          f"data.validation_file={tmp_path / 'a' / 'data' / 'validation.jsonl'}", cwd=tmp_path / "b"))
    assert "resuming from" in same.stdout and json.loads((out / "r" / "final_metrics.json").read_text())["step"] == 8


def test_a_requeue_after_an_accepted_change_that_was_never_checkpointed_follows_it_again(tmp_path):
    """Halted at 6 of 12 under lr 1e-3. Attempt 2 (lr 1e-4, allowed) rewrites config.yaml, then
    fails its save of step 12. Attempt 3, the same command, resumes step 6 again: that
    checkpoint was written under 1e-3, so the change is listed and followed again (it compared
    with config.yaml, now 1e-4, found nothing, and trained at 1e-3 under a config saying 1e-4);
    the original lr back is no change (it was refused as another run)."""
    common = [*FAST, "checkpoint.every_steps=6", "eval.every_steps=0", "train.warmup_steps=2", "train.max_steps=12", *NO_MLFLOW]
    run = tmp_path / "r"
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *common]
    check(launcher(*args, "train.halt_at_step=6"))
    changed = [*args, "train.lr=1e-4", "checkpoint.resume_changed=allow"]
    failed = launcher(*changed, env={"LAUNCHER_SAVE_ERROR": "0:12"})
    assert failed.returncode != 0 and "injected save failure" in failed.stderr, failed.stderr[-2000:]
    assert not (run / "checkpoints" / "step-000012").exists()
    lines = check(launcher(*changed)).stdout.splitlines()
    at = lines.index("resuming with a changed config (config_history.jsonl):")
    assert lines[at + 1 : at + 3] == ["  train.halt_at_step: 6 -> None", "  train.lr: 0.001 -> 0.0001"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}  # the last attempt's, for steps 7-12
    expected = _linear_lrs(1e-4, 2, 12)
    assert [lrs[s] for s in range(7, 13)] == pytest.approx([expected[s] for s in range(7, 13)])
    # The first lr back after such a failed attempt: no change against step 6, not another run.
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "back", *common]
    check(launcher(*args, "train.halt_at_step=6"))
    assert launcher(*args, "train.lr=1e-4", "checkpoint.resume_changed=allow",
                    env={"LAUNCHER_SAVE_ERROR": "0:12"}).returncode != 0
    lines = check(launcher(*args)).stdout.splitlines()
    at = lines.index("resuming with a changed config (config_history.jsonl):")
    assert lines[at + 1 :][:1] == ["  train.halt_at_step: 6 -> None"] and "  train.lr" not in " ".join(lines)


def test_rotation_skips_what_a_killed_rotation_or_a_nan_left_and_never_drops_the_best(tmp_path, monkeypatch):
    """keep_last=1 with keep_best, halted at 4 of 8. Planted beside the run's checkpoints: what an
    older launcher's rotation left when killed (step 1: COMPLETE outlived trainer_state.json, as
    rmtree's order allows) and a checkpoint scored NaN (step 3). The resume's saves went on to
    fail ("checkpoint at step 6 not written ... free space") for the first, and rotation kept the
    NaN over the real best for the second. Now both go, the best stays, and an old checkpoint
    that will not be removed is a warning, not a failed save."""
    import shutil

    from launcher.checkpoint import Checkpointer, TrainState, complete_checkpoints

    common = [*FAST, "train.max_steps=8", "checkpoint.every_steps=2", "eval.every_steps=2", "checkpoint.keep_last=1",
              "checkpoint.keep_best=true", "tracking.mlflow=false"]
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *common]
    check(launcher(*args, "train.halt_at_step=4"))
    root = tmp_path / "r" / "checkpoints"
    kept = {step: TrainState.read(p) for step, p in complete_checkpoints(root)}
    best = kept[4].best_step
    assert best in kept
    shutil.copytree(root / "step-000004", root / "step-000001")
    (root / "step-000001" / "trainer_state.json").unlink()
    shutil.copytree(root / "step-000004", root / "step-000003")
    state = json.loads((root / "step-000003" / "trainer_state.json").read_text())
    (root / "step-000003" / "trainer_state.json").write_text(json.dumps({**state, "step": 3, "metric_at_step": float("nan")}))
    check(launcher(*args))
    final = {step: TrainState.read(p) for step, p in complete_checkpoints(root)}
    assert sorted(final) == sorted({final[8].best_step, 8}) and final[8].best_step is not None
    assert not (root / "step-000001").exists() and not (root / "step-000003").exists()

    # A removal that fails: the victim loses its marker first (nothing takes what is left for a
    # checkpoint), and one warning line.
    said = []

    class Rt:
        def print(self, *a):
            said.append(" ".join(map(str, a)))

    ck = object.__new__(Checkpointer)
    ck.root, ck.rt, ck.best_in_checkpoint, ck.higher_is_better = root, Rt(), False, True
    ck.cfg = type("C", (), {"keep_last": 1, "keep_best": False, "export": "last"})()
    shutil.copytree(root / "step-000008", root / "step-000009")
    real_rmtree = shutil.rmtree

    def busy(path, *a, **k):
        if Path(path).name == "step-000008":
            raise OSError(16, "Device or resource busy")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", busy)
    ck._rotate()
    monkeypatch.undo()
    assert [step for step, _ in complete_checkpoints(root)] == [9] and (root / "step-000008").is_dir()
    assert said == [f"warning: could not remove {root / 'step-000008'} (keep_last/keep_best): [Errno 16] Device or "
                    "resource busy; remove it by hand"]
    # A NaN evaluation is never the best (as the first it stood unbeaten until patience ended the run).
    from launcher.trainer import _track_best

    state = TrainState(step=2)
    assert _track_best(state, {"loss": float("nan")}, "loss", False, 2) is None and state.best_step is None
    state.step = 4
    assert _track_best(state, {"loss": 2.0}, "loss", False, 2) is None and state.best_step == 4


def test_a_seal_or_an_export_puts_its_files_on_disk_before_its_name(tmp_path, monkeypatch):
    """Every file of a checkpoint (and its directories) is fsynced before the rename that marks it
    COMPLETE, and the checkpoints folder after it, before rotation; replace_dir (exports, the
    tokenizer) likewise. Read at the system-call boundary: os.fsync and the renames, in order."""
    import launcher.checkpoint as ckpt_lib
    from launcher.checkpoint import Checkpointer, TrainState

    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, to: (events.append(("rename", str(self), str(to))),
                                                          real_rename(self, to))[1])
    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step-000002"
    (tmp / "pytorch_model_fsdp_0").mkdir(parents=True)
    (tmp / "pytorch_model_fsdp_0" / "shard.distcp").write_bytes(b"weights")
    (tmp / "optimizer.bin").write_bytes(b"moments")

    class Rt:
        world_size, engine = 1, type("E", (), {"name": "ddp"})()

        def print(self, *a):
            pass

    ck = object.__new__(Checkpointer)
    ck.root, ck.rt, ck.write_skeleton, ck.run_config = root, Rt(), None, "train: {}\n"
    ck.best_in_checkpoint, ck.higher_is_better = False, True
    ck._seal(tmp, root / "step-000002", TrainState(step=2))
    (at,) = [i for i, e in enumerate(events) if e[0] == "rename"]
    synced = {e[1] for e in events[:at]}
    final = root / "step-000002"
    assert {str(tmp / p.relative_to(final)) for p in final.rglob("*")} | {str(tmp)} <= synced, synced
    assert ("fsync", str(root)) in events[at + 1 :]

    events.clear()
    out, new = tmp_path / "model", tmp_path / "model.tmp"
    out.mkdir()
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"exported")
    ckpt_lib.replace_dir(new, out)
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert ("fsync", str(new / "model.safetensors")) in events[: renames[0]] and ("fsync", str(new)) in events[: renames[0]]
    assert ("fsync", str(tmp_path)) in events[renames[-1] + 1 :]
    assert (out / "model.safetensors").read_bytes() == b"exported" and not (tmp_path / "model.old").exists()


def test_a_second_launch_into_a_run_in_progress_is_one_line_and_touches_nothing(tmp_path):
    """A double submit: the first launch stalls 30 s inside step 3 (its checkpoints of steps 2 and
    its temp dirs in RUN); the same command again exits 2 with one line naming the holder, and
    deletes, writes and rotates nothing there. The first ends as if alone, its lease gone."""
    from conftest import OFFLINE_ENV, communicate_or_kill

    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST, "train.max_steps=6",
            "checkpoint.every_steps=2", "eval.every_steps=2", "tracking.mlflow=false"]
    first = subprocess.Popen([sys.executable, "-m", "launcher", *args], env={**os.environ, **OFFLINE_ENV,
                             "LAUNCHER_STALL": "0:3:30"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "r"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-000002" / "COMPLETE").is_file():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.2)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*") if "ranks" not in p.parts)
    second = launcher(*args)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {run} is in use by another launch (host {os.uname().nodename}, pid ")
    assert line.endswith(f"if that launch is gone, remove {run / '.lease'}")
    assert first.poll() is None  # still inside its stall: the refusal came while it ran
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*") if "ranks" not in p.parts) == before
    out, err = communicate_or_kill(first, 300)
    assert first.returncode == 0, err[-3000:]
    assert "LAUNCHER_STALL: rank 0 sleeps 30 s at 3" in err
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 6 and not (run / ".lease").exists()


def test_a_lease_is_taken_over_from_a_dead_or_requeued_holder_only(tmp_path, monkeypatch):
    """Whose lease stands: a live process of this host, or another host's lease touched within
    STALE_S. Taken over: a process of this host that is gone, another host's lease untouched for
    longer, and this Slurm job's own earlier attempt (a requeue; this one is attempt 1). Another
    launch of the same attempt (two trainings in one allocation) was taken over too, alive."""
    from launcher import owner

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")

    run = tmp_path / "r"
    run.mkdir()
    lease = run / owner.LEASE_FILE
    here = os.uname().nodename
    sleeper = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        cases = [({"host": here, "pid": sleeper.pid}, 0, None, False), ({"host": here, "pid": gone.pid}, 0, None, True),
                 ({"host": "node-b", "pid": 1}, 10, None, False), ({"host": "node-b", "pid": 1}, owner.STALE_S + 5, None, True),
                 ({"host": "node-b", "pid": 1, "slurm_job_id": "77"}, 10, "77", True),
                 ({"host": "node-b", "pid": 1, "slurm_job_id": "77", "slurm_restart": "0"}, 10, "77", True),
                 # The same attempt of the same job: a second launch in one allocation, alive
                 ({"host": "node-b", "pid": 1, "slurm_job_id": "77", "slurm_restart": "1"}, 10, "77", False),
                 ({"host": here, "pid": sleeper.pid, "slurm_job_id": "77", "slurm_restart": "1"}, 10, "77", False),
                 ({"host": here, "pid": gone.pid, "slurm_job_id": "77", "slurm_restart": "1"}, 10, "77", True),
                 ({"host": "node-b", "pid": 1, "slurm_job_id": "76"}, 10, "77", False)]
        for holder, age, job, taken in cases:
            lease.write_text(json.dumps(holder))
            os.utime(lease, (time.time() - age, time.time() - age))
            mine = owner.Lease(run, job)
            said = mine.take()
            assert (said is None) == taken, (holder, age, job, said)
            assert json.loads(lease.read_text())["pid"] == (os.getpid() if taken else holder["pid"])
            if taken:
                mine.release()
                assert not lease.exists()
        # Half written (a holder between creating its lease and writing it): alive, not taken over;
        # left so longer than WRITING_S, its writer died there.
        for age, taken in ((1, False), (owner.WRITING_S + 5, True)):
            lease.write_text('{"host": "nod')
            os.utime(lease, (time.time() - age, time.time() - age))
            mine = owner.Lease(run, "77")
            said = mine.take()
            assert (said is None) == taken, (age, said)
            if taken:
                mine.release()
            else:
                assert "its lease is being written" in said and lease.read_text() == '{"host": "nod'
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_started_from_another_runs_checkpoint_is_a_new_run_and_requeues_onto_its_own(tmp_path):
    """checkpoint.resume=PATH of another run, with a new --run-name, lr and data: a new run
    directory (config.yaml, job.json), a new MLflow run (the source run keeps only its own
    steps), the source's tokenizer, no best evaluation of the source's, and the new lr's
    schedule from the next step. The same command again after a halt goes on from this run's
    own latest checkpoint, in the same MLflow run, even once PATH is gone. A change the
    weights cannot fit (against the config the checkpoint holds, wherever it was copied), or
    an existing directory, is one line."""
    import shutil

    from launcher.config import load_config

    common = ["--output-dir", str(tmp_path), *FAST, "checkpoint.every_steps=2", "eval.every_steps=2",
              "train.warmup_steps=2", "train.max_steps=8"]
    check(launcher("train", str(TINY), "--run-name", "src", *common, "train.halt_at_step=4", "eval.at_start=true"))
    assert json.loads((tmp_path / "src" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["first_eval"]
    check(launcher("train", str(TINY), "--run-name", "other", *common, "train.halt_at_step=2"))
    source = tmp_path / "src" / "checkpoints" / "step-000004"
    start = [f"checkpoint.resume={source}", "train.lr=1e-4"]
    for name, extra, said in (
            ("wider", ["model.tiny.hidden_size=64"], f"checkpoint.resume: {source} was written with "
             "model.tiny.hidden_size: 32 -> 64: its weights do not load into this model; keep those values"),
            ("longer", ["data.max_length=96"], f"checkpoint.resume: {source} was written with "  # the position table
             "data.max_length: 64 -> 96: its weights do not load into this model; keep those values"),
            ("other", [], f"checkpoint.resume: {source} is another run's checkpoint, and {tmp_path / 'other'} already "
             "exists: a run started from it needs a new --run-name")):
        proc = launcher("train", str(TINY), "--run-name", name, *common, *start, *extra)
        assert proc.returncode == 2 and [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [f"error: {said}"]
    # Copied out of its run (no config.yaml beside it): the config it was written under is in it.
    copied = tmp_path / "elsewhere" / "step-000004"
    shutil.copytree(source, copied)
    proc = launcher("train", str(TINY), "--run-name", "wider", *common, f"checkpoint.resume={copied}", "model.tiny.hidden_size=64")
    assert proc.returncode == 2 and [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
        f"error: checkpoint.resume: {copied} was written with model.tiny.hidden_size: 32 -> 64: its weights do not load "
        "into this model; keep those values"], proc.stderr[-3000:]
    assert not (tmp_path / "wider").exists() and not (tmp_path / "longer").exists()
    # Another global batch goes on at the new batches' place in the data order: it says how many
    # rows that skips (it skipped them without a word)
    wide = check(launcher("train", str(TINY), "--run-name", "wide", *common, *start, "train.global_batch_size=64",
                          "train.max_steps=5", "eval.every_steps=0"))
    assert any(re.fullmatch(r"  the data goes on at step 5's place in batches of 64: of epoch 1's rows, \d+ are "
                            r"skipped and \d+ read again", line) for line in wide.stdout.splitlines()), wide.stdout[-3000:]

    fork = ["train", str(TINY), "--run-name", "fork", *common, *start, "data.synthetic.seed=1", "train.weight_decay=0.05"]
    first = check(launcher(*fork, "train.halt_at_step=6"))
    assert f"resuming from {source}" in first.stdout.splitlines()
    assert {"  train.lr: 0.001 -> 0.0001", "  train.weight_decay: 0.01 -> 0.05"} <= set(first.stdout.splitlines())
    run = tmp_path / "fork"
    assert load_config(run / "config.yaml", check_files=False).train.lr == 1e-4
    assert json.loads((run / "job.json").read_text())["started_from"] == str(source.resolve())
    # Other data, the same vocabulary: the tokenizer the checkpoint's weights were trained with.
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (tmp_path / "src" / "tokenizer" / "tokenizer.json").read_text()

    shutil.rmtree(source)  # rotated away in its run, say
    again = check(launcher(*fork))  # a requeue: the same command
    assert f"resuming from {run / 'checkpoints' / 'step-000006'}" in again.stdout.splitlines()
    # The optimizer restored the source's groups; the decaying one takes the new weight decay.
    groups = torch.load(run / "checkpoints" / "step-000008" / "optimizer.bin", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["best_step"] in (6, 8) and final["exported_step"] in (6, 8)  # not the source's steps 2 or 4
    assert final["before"] == {}  # the source's step-0 evaluation is not this run's
    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in all_runs(client)}
    assert sorted(runs) == ["fork", "other", "src", "wide"]
    steps = {name: [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] for name, r in runs.items()}
    assert steps["src"] == [1, 2, 3, 4] and steps["fork"] == [5, 6, 7, 8]
    assert runs["fork"].data.params["started_from"] == str(source.resolve())
    lrs = {m.step: m.value for m in client.get_metric_history(runs["fork"].info.run_id, "train/lr")}
    expected = _linear_lrs(1e-4, 2, 8)
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)])


def test_a_checkpoint_rotated_away_while_it_is_read_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Another run's checkpoint.keep_last removes its checkpoints as it trains. One removed
    while a run started from it (checkpoint.resume=PATH) was a traceback, and the new run's
    directory stayed, so the same name was refused after; one removed while `launcher
    export` read it was a traceback too, or a line blaming missing weights. Each is one line
    now, naming the latest checkpoint beside it, and nothing is left. The start is stopped at
    a fail point (the run directory taken, the checkpoint not read) while the checkpoint is
    removed as rotation removes one: its marker first."""
    import shutil

    import psutil

    from launcher import engines
    from launcher.cli import main

    common = ["--output-dir", str(tmp_path), *FAST, "checkpoint.every_steps=2", "eval.every_steps=2", "train.max_steps=4"]
    check(launcher("train", str(TINY), "--run-name", "src", *common))
    source, latest = (tmp_path / "src" / "checkpoints" / f"step-00000{n}" for n in (2, 4))

    def rotate(ckpt: Path) -> None:
        (ckpt / "COMPLETE").unlink()
        shutil.rmtree(ckpt)

    proc = subprocess.Popen([sys.executable, "-m", "launcher", "train", str(TINY), "--run-name", "fork", *common,
                             f"checkpoint.resume={source}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **OFFLINE_ENV, "LAUNCHER_FAILPOINT": "load"})
    try:
        deadline = time.time() + 300
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        assert (tmp_path / "fork" / "job.json").is_file()
        rotate(source)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        f"error: {source}: removed while this run loaded it (its run keeps only checkpoint.keep_last checkpoints); give "
        f"one that stays, or copy it elsewhere first; the latest complete one beside it is {latest}"]
    assert not (tmp_path / "fork").exists()  # the same name starts afresh

    read = engines.merged_weights

    def read_then_rotated(ckpt: Path):  # the weights read, then the checkpoint goes before the export is written
        weights = read(ckpt)
        rotate(ckpt)
        return weights

    monkeypatch.setattr(engines, "merged_weights", read_then_rotated)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(latest), str(tmp_path / "exported")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {latest}: removed while it was exported (its run keeps only checkpoint.keep_last checkpoints); give one "
        "that stays, or copy it elsewhere first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no export, no temporary beside it
    assert main(["export", str(latest), str(tmp_path / "exported")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {latest}: no such checkpoint"]


def test_eval_reads_a_json_array_as_training_does(trained_binary, tmp_path):
    """Training's reader takes a .json file holding one array of rows; eval gives those rows
    the same scores as the same rows in JSONL, and a broken array is one line naming the file."""
    _, run = trained_binary
    data = run / "data" / "validation.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    (tmp_path / "val.json").write_text(json.dumps(rows, indent=1))
    lines = json.loads(check(launcher("eval", str(run / "model"), "--data", str(data))).stdout)
    array = json.loads(check(launcher("eval", str(run / "model"), "--data", str(tmp_path / "val.json"))).stdout)
    assert array == lines and array["n"] == len(rows)
    # predict too: the rows' texts, not the array's lines.
    (tmp_path / "val.jsonl").write_text(data.read_text())
    for name in ("val.json", "val.jsonl"):
        check(launcher("predict", str(run / "model"), "--input", str(tmp_path / name), "--output", str(tmp_path / f"{name}.out")))
    assert (tmp_path / "val.json.out").read_text() == (tmp_path / "val.jsonl.out").read_text()
    assert len((tmp_path / "val.json.out").read_text().splitlines()) == len(rows)
    (tmp_path / "broken.json").write_text(json.dumps(rows[:3], indent=1)[:-3])
    bad = launcher("eval", str(run / "model"), "--data", str(tmp_path / "broken.json"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [x for x in bad.stderr.splitlines() if x.startswith("error:")][0].startswith(f"error: {tmp_path / 'broken.json'}:")


def test_a_kept_tokenizer_appears_whole_or_not_at_all(tmp_path):
    """A tiny model's tokenizer is written beside RUN/tokenizer and renamed into place: a write
    cut short (a kill) leaves no tokenizer.json that a slower rank or a resume would read half
    of, and the next attempt replaces whatever it left."""
    from transformers import AutoTokenizer

    from launcher.data.tokenizer import train_lm_tokenizer
    from launcher.trainer import _keep_tokenizer

    tok = train_lm_tokenizer(["the provider may change terms at any time"], 60, 16)
    out = tmp_path / "tokenizer"

    class Killed:
        def save_pretrained(self, where):
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _keep_tokenizer(Killed(), out)
    assert not (out / "tokenizer.json").exists()
    out.mkdir()
    (out / "special_tokens_map.json").write_text("{")  # an older launcher's write, cut short
    _keep_tokenizer(tok, out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    assert not (out / "special_tokens_map.json").exists() or (out / "special_tokens_map.json").read_text() != "{"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_an_extended_run_exports_the_same_tokenizer_and_ends_with_its_new_export_in_the_tracker(tmp_path):
    """A run tokenizes its rows and exports; extended, its second process reads them from the
    token cache and exports again: tokenizer.json is the same file both times, as the tokenizer
    loaded it (no truncation). Before, the process that tokenized saved its max_length as the
    file's truncation, which the tokenizers library then applies to every text it encodes.

    exported.step and its score were params, which MLflow never changes: the run extended from
    2 steps to 4 still said it exported step 2. They are tags now, replaced at each end."""
    exported, caches, outs = [], [], []
    for steps in (2, 4):
        outs.append(check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST,
                                   f"train.max_steps={steps}", "eval.every_steps=2", "checkpoint.every_steps=2",
                                   "checkpoint.export=last")))
        exported.append((tmp_path / "r" / "model" / "tokenizer.json").read_bytes())
        caches.append(sorted(p.name for p in (tmp_path / ".cache").glob("tokens-*")))
    assert caches[0] and caches[1] == caches[0]  # the first built the token rows, the second read them
    assert exported[0] == exported[1]
    built = json.loads(next((tmp_path / ".cache").glob("tokenizer-*/tokenizer.json")).read_text())
    saved = json.loads(exported[0])
    assert (saved["truncation"], saved["padding"]) == (built["truncation"], built["padding"])
    (run,) = all_runs(mlflow_client(tmp_path))
    final = json.loads((tmp_path / "r" / "final_metrics.json").read_text())
    assert final["exported_step"] == 4 and run.data.tags["exported.step"] == "4"
    assert float(run.data.tags["exported.macro_f1"]) == pytest.approx(final["after"]["macro_f1"], abs=1e-9)
    # The schedule is spread over 4 steps now, so step 3's lr is not where the old one would
    # have gone on; the run says so (it said only "train.max_steps: 2 -> 4").
    lrs = {r["step"]: r["train/lr"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in r}
    said = next(line for line in outs[1].stdout.splitlines() if line.startswith("learning rate: step 3 runs at "))
    assert said.startswith(f"learning rate: step 3 runs at {lrs[3]:.3g} on the new 4-step linear schedule (the checkpoint's")


def test_a_run_whose_saved_tokenizer_does_not_load_says_so_in_one_line_and_rebuilds_it(tmp_path):
    """RUN/tokenizer/tokenizer.json cut short (an older launcher's non-atomic write, killed): the
    resume exits 2 with one line naming the file and what to do, not a JSON traceback; removing
    the directory, as it says, rebuilds the same tokenizer from the training data and resumes."""
    from transformers import AutoTokenizer

    common = [*FAST, "train.max_steps=8", "checkpoint.every_steps=4", "eval.every_steps=0", *NO_MLFLOW]
    cmd = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *common]
    check(launcher(*cmd, "train.halt_at_step=4"))
    saved = tmp_path / "r" / "tokenizer"
    vocab = AutoTokenizer.from_pretrained(saved).get_vocab()
    text = (saved / "tokenizer.json").read_text()
    (saved / "tokenizer.json").write_text(text[: len(text) // 2])
    proc = launcher(*cmd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {saved / 'tokenizer.json'}: the run's saved tokenizer does not load (")
    assert line.endswith(f"remove {saved} to rebuild it from the training data")
    assert not (tmp_path / "r" / "checkpoints" / "step-000008").exists()
    import shutil

    shutil.rmtree(saved)
    again = check(launcher(*cmd))
    assert f"resuming from {tmp_path / 'r' / 'checkpoints' / 'step-000004'}" in again.stdout.splitlines()
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == vocab
    assert (tmp_path / "r" / "model" / "model.safetensors").is_file()


def test_a_resume_into_another_tracking_store_starts_a_new_run_there_found_again_after_a_kill(tmp_path):
    """tracking.uri changed between attempts (a team server instead of the local store): the
    recorded run id is not in the new store, and every attempt failed its start on it, exit 2.
    Now one line says so and a new run there takes the history over from metrics.jsonl.

    That attempt kept the new run's id only in memory until its next checkpoint: killed before
    that, the next attempt made a third run and left the second RUNNING. job.json now holds the
    new id at once."""
    from mlflow.tracking import MlflowClient

    from test_faults import _kill_tree_when_stopped

    common = [*FAST, "checkpoint.every_steps=3", "eval.every_steps=1000"]
    stores = [f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db")]
    base = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *common]
    check(launcher(*base, "train.max_steps=3", f"tracking.uri={stores[0]}"))
    (old,) = all_runs(MlflowClient(tracking_uri=stores[0]))
    cmd = [sys.executable, "-m", "launcher", *base, "train.max_steps=6", f"tracking.uri={stores[1]}"]
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE_ENV, "LAUNCHER_FAILPOINT": "step:4"},
                                stdout=subprocess.DEVNULL, stderr=err)
        _kill_tree_when_stopped(proc)  # at step 4: its run exists, its next checkpoint (step 6) does not
    assert f"tracking: MLflow run {old.info.run_id} is not in {stores[1]}" in (tmp_path / "killed.err").read_text()
    check(launcher(*base, "train.max_steps=6", f"tracking.uri={stores[1]}"))
    client = MlflowClient(tracking_uri=stores[1])
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED" and run.data.tags["launcher.attempts"] == "2"
    assert run.data.tags["launcher.previous_run_id"] == old.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))


def test_an_abandoned_extension_is_closed_when_the_old_length_is_asked_again(tmp_path):
    """Extended from 3 steps to 6 and killed at step 5 (before its first checkpoint), then run
    again with the old max_steps: "already finished", rightly, but metrics.jsonl kept step 4
    (the plot drew it) and the MLflow run stayed RUNNING. The records go and the run ends."""
    from test_faults import _kill_tree_when_stopped

    base = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST, "checkpoint.every_steps=3",
            "eval.every_steps=1000", "tracking.flush_every_steps=1"]
    check(launcher(*base, "train.max_steps=3"))
    cmd = [sys.executable, "-m", "launcher", *base, "train.max_steps=6"]
    proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE_ENV, "LAUNCHER_FAILPOINT": "step:5"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_tree_when_stopped(proc)
    jsonl = tmp_path / "r" / "metrics.jsonl"
    past = sorted({json.loads(line)["step"] for line in jsonl.read_text().splitlines()} - {0, 1, 2, 3})
    assert past and past[0] == 4, past  # step 4 logged (step 5's record may not be, killed inside it)
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "RUNNING"
    out = check(launcher(*base, "train.max_steps=3")).stdout
    steps = "step 4" if past == [4] else f"steps 4-{past[-1]}"
    assert (f"{tmp_path / 'r'} already finished at step 3; nothing to do; the records of an abandoned attempt past it "
            f"({steps}) are dropped from metrics.jsonl and its tracker run is closed, its points tagged "
            "launcher.abandoned_steps") in out.splitlines()
    assert max(json.loads(line)["step"] for line in jsonl.read_text().splitlines()) == 3
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.data.tags["launcher.abandoned_steps"] == steps.split(" ")[1]
    # Asked once more: nothing left to close, the plain line.
    assert f"{tmp_path / 'r'} already finished at step 3; nothing to do" in check(launcher(*base, "train.max_steps=3")).stdout.splitlines()

    # Killed again, its records not yet written (flushed every 25 steps by default): the MLflow
    # run it set RUNNING is closed all the same.
    cmd = [sys.executable, "-m", "launcher", *base[:-1], "train.max_steps=6"]
    proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE_ENV, "LAUNCHER_FAILPOINT": "step:4"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_tree_when_stopped(proc)
    assert max(json.loads(line)["step"] for line in jsonl.read_text().splitlines()) == 3
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "RUNNING"
    out = check(launcher(*base, "train.max_steps=3")).stdout
    assert (f"{tmp_path / 'r'} already finished at step 3; nothing to do; its tracker run, left running, is closed"
            in out.splitlines()), out
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED"


def test_ranks_that_still_see_different_checkpoints_stop_with_one_line(monkeypatch, tmp_path):
    """The ranks compare the checkpoint each found (checkpoint.agreed_start; on 2 real ranks in
    test_distributed): one that keeps seeing another ends the run in one line naming both, after
    looking again; a refusal every rank shares is that refusal."""
    from launcher import checkpoint
    from launcher.errors import ConfigError

    monkeypatch.setattr(checkpoint, "AGREE_WAITS_S", (0, 0))
    said: list[str] = []
    mine = checkpoint.Start(checkpoint=tmp_path / "step-000006")
    with pytest.raises(ConfigError) as e:
        checkpoint.agreed_start(lambda: mine, lambda seen: [seen, "step 0"], said.append)
    assert e.value.problems == [f"checkpoint.resume: the ranks see different checkpoints (rank 0: {mine.checkpoint}; rank 1: "
                                "step 0) after 0 s: every node must see the same run directory"]
    assert len(said) == 2 and all("looking again in 0 s" in x for x in said)

    def refuse():
        raise ConfigError("run directory R exists but holds no complete checkpoint to resume")

    with pytest.raises(ConfigError, match="^run directory R exists"):
        checkpoint.agreed_start(refuse, lambda seen: [seen, seen], said.append)
    assert len(said) == 2


def test_stack_fact_safetensors_files_ignore_the_umask_and_exports_get_its_mode(tmp_path):
    """safetensors 0.8 creates its files 0600 whatever the umask (the e2e layout test reads the
    whole run under this process's umask); readable_weights gives them the umask's mode."""
    import os

    import torch
    from safetensors.torch import save_file

    from launcher.checkpoint import readable_weights

    old = os.umask(0o022)
    try:
        save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text("{}")
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o600  # the library's choice
        readable_weights(tmp_path)
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644 == (tmp_path / "config.json").stat().st_mode & 0o777
    finally:
        os.umask(old)


def test_an_evaluation_reaches_mlflow_when_it_is_made_not_at_the_next_flush(tmp_path):
    """tracking.flush_every_steps=100 on a 10-step run, an evaluation at step 5 and no checkpoint
    before the end: while the run sleeps inside step 7, step 5's evaluation and every step's
    loss up to it are in MLflow (they waited in the buffer for the end of the run)."""
    cmd = [sys.executable, "-m", "launcher", "train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST,
           "train.max_steps=10", "eval.every_steps=5", "checkpoint.every_steps=0", "tracking.flush_every_steps=100"]
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE_ENV, "LAUNCHER_STALL": "0:7:3600"},
                                stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.time() + 300
        while "LAUNCHER_STALL: rank 0 sleeps 3600 s at 7" not in errors.read_text():
            assert proc.poll() is None and time.time() < deadline, errors.read_text()[-3000:]
            time.sleep(0.1)
        client = mlflow_client(tmp_path)
        deadline = time.time() + 60  # the sender thread sends while the step sleeps

        def sent(key: str) -> list[int]:
            runs = all_runs(client)
            return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key)) if runs else []

        while sent("eval/macro_f1") != [0, 5] and time.time() < deadline:
            time.sleep(0.5)
        assert sent("eval/macro_f1") == [0, 5]
        assert sent("train/loss") == [1, 2, 3, 4, 5]  # (step 6's, logged after it, is not due)
    finally:
        proc.kill()
        proc.wait()


def test_a_category_no_training_or_validation_row_has_is_named_in_a_note(tmp_path):
    """A category (or class) no training row has cannot be learned, and its F1 of 0 counts in
    every macro-F1 the run reports: the run names it, with the validation rows that have it, in
    a note (a subset of the data, or an id off by one, trained without a word). Read from the
    files here, not from the code's counts."""
    check(launcher("synth", str(tmp_path / "d"), "--n-train", "200", "--n-validation", "120"))
    rows = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "d" / "validation.jsonl").read_text().splitlines()]
    first = UNFAIR_TOS_CATEGORIES[0]
    has = [r for r in val if 0 in r["labels"]]
    assert has and any(0 in r["labels"] for r in rows)  # (the synthetic data has it: dropped below)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if 0 not in r["labels"]))
    (tmp_path / "fair.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if not r["labels"]))
    common = ["train", str(TINY), *FAST, "train.max_steps=1", "eval.every_steps=100", "tracking.mlflow=false",
              "data.synthetic.enabled=false",
              f"data.validation_file={tmp_path / 'd' / 'validation.jsonl'}"]
    multi = check(launcher(*common, "--output-dir", str(tmp_path / "m"), "data.mode=multilabel",
                           f"data.train_file={tmp_path / 't.jsonl'}"))
    note = f"note: no training row has {first!r} ({len(has)} validation rows): the model cannot learn it, and an F1"
    assert note in multi.stdout, multi.stdout
    binary = check(launcher(*common, "--output-dir", str(tmp_path / "b"), f"data.train_file={tmp_path / 'fair.jsonl'}"))
    assert f"note: no training row has 'unfair' ({sum(bool(r['labels']) for r in val)} validation rows)" in binary.stdout
    whole = check(launcher(*common, "--output-dir", str(tmp_path / "w"), "data.mode=multilabel",
                           f"data.train_file={tmp_path / 'd' / 'train.jsonl'}"))
    assert "no training row has" not in whole.stdout and "no validation row has" not in whole.stdout
    # A category the validation rows lack scores F1 0 at every evaluation: said too.
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val if 0 not in r["labels"]))
    lacking = check(launcher(*common[:-1], f"data.validation_file={tmp_path / 'v.jsonl'}", "--output-dir",
                             str(tmp_path / "v"), "data.mode=multilabel", f"data.train_file={tmp_path / 'd' / 'train.jsonl'}"))
    assert (f"note: no validation row has {first!r}: an F1 of 0 for each at every evaluation counts in the macro-F1"
            in lacking.stdout.splitlines()), lacking.stdout


def test_one_of_three_classes_trains_evaluates_predicts_and_loads_in_transformers(tmp_path):
    """data.mode=multiclass: a softmax over data.label_names, labels by name or id, read from
    columns named by data.text_column and data.label_column (recorded for eval and predict). The run's
    exported evaluation equals `launcher eval`'s (class-weighted loss included), `predict`'s
    probabilities are a distribution whose likeliest class is its label, and transformers'
    pipeline reads the same classes. Before, three classes were refused ("binary mode needs 2
    names") or ran as three independent yes/no outputs."""
    import random

    names = ["negative", "neutral", "positive"]
    words = {"negative": ["awful", "bad", "terrible"], "neutral": ["okay", "average", "plain"],
             "positive": ["great", "lovely", "excellent"]}
    rng = random.Random(0)

    def rows(n: int) -> list[dict]:
        out = []
        for i in range(n):
            c = rng.randrange(3)
            out.append({"text": f"the film was {rng.choice(words[names[c]])} and {rng.choice(words[names[c]])}",
                        "label": names[c] if i % 2 else c})  # by name and by id
        return out

    # (in columns of their own, as SST-2's sentence: data.text_column and data.label_column)
    for name, n in (("train", 96), ("val", 30)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"sentence": r["text"], "sentiment": r["label"]}) + "\n"
                                                        for r in rows(n)))
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "o"), *FAST, "tracking.mlflow=false",
                   "data.synthetic.enabled=false", "data.mode=multiclass", "data.label_names=[negative,neutral,positive]",
                   f"data.train_file={tmp_path / 'train.jsonl'}", f"data.validation_file={tmp_path / 'val.jsonl'}",
                   "train.max_steps=12", "train.lr=3e-3", "eval.every_steps=6", "train.class_weighting=balanced",
                   "eval.metric=accuracy", "data.text_column=sentence", "data.label_column=sentiment"))
    run = tmp_path / "o" / "clause_tiny"
    model = run / "model"
    after = json.loads((run / "final_metrics.json").read_text())["after"]
    assert {f"f1/{n}" for n in names} | {"accuracy"} <= set(after) and "f1/none" not in after, after
    config = json.loads((model / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["problem_type"] == "single_label_classification"
    assert len(json.loads((model / "launcher.json").read_text())["class_weights"]) == 3
    scored = json.loads(check(launcher("eval", str(model), "--data", str(tmp_path / "val.jsonl"))).stdout)
    for key in ("macro_f1", "accuracy", "loss", *(f"f1/{n}" for n in names)):
        assert scored[key] == pytest.approx(after[key], abs=1e-5), key
    asked = [{"sentence": "the film was awful and bad", "labels": ["neutral"]}, {"sentence": "the film was lovely and great"}]
    (tmp_path / "ask.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asked))
    answers = [json.loads(line) for line in check(launcher("predict", str(model), "--input",
                                                           str(tmp_path / "ask.jsonl"))).stdout.splitlines()]
    for answer in answers:
        assert list(answer["probs"]) == names and sum(answer["probs"].values()) == pytest.approx(1, abs=1e-5)
        assert answer["label"] == max(answer["probs"], key=answer["probs"].get)
    assert answers[0]["input_labels"] == ["neutral"] and "labels" not in answers[0]  # (a gold column is kept apart)
    from transformers import pipeline

    read = pipeline("text-classification", model=str(model), device="cpu")([r["sentence"] for r in asked])
    assert [r["label"] for r in read] == [a["label"] for a in answers]
    # A file without the columns the model trained on: one line naming them, for eval and predict.
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "the film was okay", "label": 1}) + "\n")
    proc = launcher("eval", str(model), "--data", str(tmp_path / "plain.jsonl"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {tmp_path / 'plain.jsonl'}: no 'sentence' (the model's data.text_column) and no 'sentiment' (the model's "
        "data.label_column) column (its columns: 'text', 'label')"), proc.stderr
    proc = launcher("predict", str(model), "--input", str(tmp_path / "plain.jsonl"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --input: {tmp_path / 'plain.jsonl'}: no 'sentence' column, the model's data.text_column, (its columns: "
        "'text', 'label')"), proc.stderr
