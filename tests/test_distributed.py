"""Two CPU ranks over gloo with the real engines: DDP, DeepSpeed ZeRO-1/2/3 (+offload), FSDP2, two nodes.

Every run uses the shipped accelerate YAML unchanged (plus --num_processes 2), and is
compared with a one-process run of the same config: same global batch, same seed.

Tolerance for "same weights": the sampler gives each rank a slice of the same global
batch and dropout is seeded per (step, micro-batch within the global batch), so the
runs compute the same math and differ only in floating-point reduction order.
Measured on 12 steps: max |w_2rank - w_1proc| = 7e-9 (DDP), 7e-9 (ZeRO-2),
1.5e-8 (ZeRO-3), 1.2e-7 (ZeRO-3 + offload, DeepSpeed's CPU Adam). One optimizer step
moves weights by ~1e-4 to 1e-3 at lr 1e-3, so 1e-5 catches a lost, repeated or
reordered step or batch while leaving 100x headroom over reduction noise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (CONFIGS, FAST, NO_MLFLOW, OFFLINE_ENV, ROOT, TINY, TWELVE_STEPS, all_runs, check, communicate_or_kill, exported_checkpoint,
                      launcher, mlflow_client)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ACCEL = CONFIGS / "accelerate"
STEPS = TWELVE_STEPS  # the steps of the shared one-process reference (conftest.twelve_steps)
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SFT = CONFIGS / "train" / "sft_tiny.yaml"
SFT_FAST = ["data.synthetic.n_train=128", "data.synthetic.n_validation=24", "model.tiny.hidden_size=32",
            "model.tiny.intermediate_size=64", "train.max_steps=8", "eval.every_steps=4", "checkpoint.every_steps=4",
            "eval.max_new_tokens=4"]


def accelerate_launch(launch_args: list[str], out: Path, name: str, *extra: str, port: int | None = None,
                      wait: bool = True, config: Path = TINY, base: list[str] = FAST + STEPS, env: dict | None = None,
                      stderr=subprocess.PIPE):
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", *launch_args,
           "--main_process_port", str(port or free_port()), "-m", "launcher", "train", str(config),
           "--output-dir", str(out), "--run-name", name, "train.hang_timeout_s=300", *base, *extra]
    env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return run_or_show_stacks(cmd, env, out / name)


def run_or_show_stacks(cmd: list[str], env: dict, run_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """subprocess.run; a launch still running after `timeout` is killed with its ranks and fails
    the test with its output and the stacks the hang watchdog wrote (train.hang_timeout_s)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        try:
            for child in psutil.Process(proc.pid).children(recursive=True):  # the ranks: sessions of their own
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass  # it ended just now
        out, err = proc.communicate()
        stacks = "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(run_dir.glob("ranks/*.stack")))
        raise AssertionError(f"{' '.join(cmd[:8])} ... still running after {timeout} s\nSTDOUT:\n{out[-3000:]}\n"
                             f"STDERR:\n{err[-4000:]}\nSTACKS:\n{stacks or '(none written)'}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(run_dir: Path) -> dict:
    return load_model_weights(run_dir / "model")


def load_model_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def metric_steps(out: Path, key: str) -> tuple[list[int], list[float]]:
    client = mlflow_client(out)
    (run,) = all_runs(client)  # exactly one run for the whole job, across ranks and attempts
    history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in history], [m.value for m in history]


def check_ranks(run_dir: Path, world: int = 2) -> list[dict]:
    """Each rank wrote what it was; accelerate's view must equal torch.distributed's."""
    files = sorted((run_dir / "ranks").glob("rank-*.json"))
    assert [f.name for f in files] == [f"rank-{r:05d}.json" for r in range(world)]
    facts = [json.loads(f.read_text()) for f in files]
    for r, f in enumerate(facts):
        assert (f["rank"], f["world_size"]) == (r, world)
        assert f["torch_distributed"] == {"rank": r, "world_size": world, "backend": "gloo"}
    return facts


def check_export_predicts_like_the_run(run_dir: Path, data: Path | None = None):
    """`launcher eval` on the exported model reproduces the in-memory model's final eval."""
    final = json.loads((run_dir / "final_metrics.json").read_text())["after"]
    proc = check(launcher("eval", str(run_dir / "model"), "--data", str(data or run_dir / "data" / "validation.jsonl")))
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["n"] == final["n"] == 100
    assert fresh["loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert fresh["macro_f1"] == final["macro_f1"] and fresh["micro_f1"] == final["micro_f1"]


@pytest.fixture(scope="module")
def reference(twelve_steps):
    """One process, same config: accumulation 2 x micro 16 instead of 2 ranks x micro 16."""
    return twelve_steps


def test_ddp_two_cpu_ranks(tmp_path, reference):
    proc = check(accelerate_launch(["--config_file", str(ACCEL / "cpu_ddp.yaml")], tmp_path, "ddp"))
    run = tmp_path / "ddp"
    # Rank facts are true (not "rank 0 of 1" twice, NOTES.md) and only rank 0 prints.
    assert proc.stdout.count("run directory:") == 1
    assert "(2 process(es) on 1 node(s), MULTI_CPU" in proc.stdout
    assert "16 x 1 accumulation x 2 ranks" in proc.stdout  # global batch 32 kept, accumulation derived
    facts = check_ranks(run)
    # Tokenized once: rank 0 wrote the cache, rank 1 read it.
    assert [f["tokenized_here"] for f in facts] == [{"train": True, "validation": True}, {"train": False, "validation": False}]
    ckpt = run / "checkpoints" / "step-000012"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.data.tags["world_size"] == "2" and mlrun.data.tags["distributed_type"] == "MULTI_CPU"
    assert metric_steps(tmp_path, "train/loss")[0] == list(range(1, 13))
    assert max_diff(weights(run), weights(reference[1])) < TOL
    # 100 validation rows over 2 ranks x 16 per batch: padded batches, yet each row counted once.
    check_export_predicts_like_the_run(run)


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.matrix), 3])
def test_zero_halted_and_resumed_equals_one_uninterrupted_process(stage, tmp_path, reference):
    """ZeRO-N on 2 ranks: 6 steps, stop, resume 6 more == 12 steps in one process. (ZeRO-2's
    resume also runs in make test, killed at its export: test_faults.)"""
    launch = ["--config_file", str(ACCEL / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2"]
    first = check(accelerate_launch(launch, tmp_path, "z", "train.halt_at_step=6"))
    assert "stopped at step 6 (train.halt_at_step)" in first.stdout and first.stdout.count("run directory:") == 1
    assert "(2 process(es) on 1 node(s), DEEPSPEED" in first.stdout
    run = tmp_path / "z"
    shards = {p.name for p in (run / "checkpoints" / "step-000006" / "pytorch_model").iterdir()}
    per_rank = {"optim"} if stage == 2 else {"optim", "model"}
    assert shards >= {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in per_rank}
    if stage == 3:  # really sharded: each rank holds half of every partitioned parameter
        line = next(x for x in first.stdout.splitlines() if x.startswith("ZeRO-3: parameters held per rank"))
        held, total = line.rsplit(": ", 1)[1].split(" of ")
        held = [int(x.replace(",", "")) for x in held.split(" / ")]
        assert len(held) == 2 and all(h < int(total.replace(",", "")) for h in held)
        assert sum(held) >= int(total.replace(",", ""))

    # Shards of 2 ranks on 1 process: one line, nothing loaded (DeepSpeed would say it with a traceback).
    one = launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "z", *FAST, *STEPS)
    assert one.returncode == 2 and one.stderr.strip().splitlines()[-1] == (
        f"error: {run / 'checkpoints' / 'step-000006'}: written by ZeRO-{stage} on 2 rank(s); this launch is "
        "one process or DDP: resume with the engine that wrote it (its accelerate config)"), one.stderr[-2000:]
    # Rank 1 misses the checkpoint at first, as a node whose shared file system has not caught
    # up: it refused the run alone (no complete checkpoint) while rank 0 loaded step 6. The
    # ranks compare what they see and look again until they agree.
    second = check(accelerate_launch(launch, tmp_path, "z", env={"LAUNCHER_HIDE_CHECKPOINT": "1:6"}))
    assert "warning: the ranks see different checkpoints (rank 0: " in second.stdout and "looking again in 2 s" in second.stdout
    assert "resuming from" in second.stdout and "step-000006" in second.stdout
    check_ranks(run)
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.data.tags["zero_stage"] == str(stage) and mlrun.data.tags["launcher.attempts"] == "2"
    steps, lrs = metric_steps(tmp_path, "train/loss")[0], metric_steps(tmp_path, "train/lr")[1]
    assert steps == list(range(1, 13))  # no step logged twice, none missing
    assert lrs == pytest.approx(metric_steps(reference[0], "train/lr")[1])  # the schedule did not restart
    # Clipping sees the same global gradient norm as one process does (DeepSpeed clips inside its step).
    assert metric_steps(tmp_path, "train/grad_norm")[1] == pytest.approx(metric_steps(reference[0], "train/grad_norm")[1], rel=1e-4)
    assert max_diff(weights(run), weights(reference[1])) < TOL
    check_export_predicts_like_the_run(run)
    # The offline export of the sharded checkpoint is the same model as the live export.
    out = tmp_path / "exported"
    proc = check(launcher("export", str(exported_checkpoint(run)), str(out)))
    assert "DeepSpeed ZeRO shards" in proc.stdout
    assert max_diff(load_model_weights(out), weights(run)) < 1e-6


@pytest.mark.parametrize("name", ["cpu_ddp", "deepspeed_zero2", "deepspeed_zero3",
                                  pytest.param("deepspeed_zero1", marks=pytest.mark.matrix),
                                  pytest.param("deepspeed_zero3_offload", marks=pytest.mark.matrix)])
def test_a_run_resumes_on_another_number_of_ranks_exactly(name, tmp_path, reference):
    """Three attempts: 2 ranks halt at step 4, 1 rank at 8, 2 ranks end at 12. DDP's full state
    loads anywhere; ZeRO-N shards are converted at each resume at another world size to
    DeepSpeed's universal checkpoint (fp32 masters and Adam moments, partitioned anew), which
    is said. Each continues exactly: the first loss after each resume is the uninterrupted
    run's at that step, and the weights end equal to one process's. One MLflow run holds
    every step once and each world-size change."""
    config = ["--config_file", str(ACCEL / f"{name}.yaml")]
    said = []
    for world, halt in ((2, 4), (1, 8), (2, None)):
        proc = check(accelerate_launch(config + ["--num_processes", str(world)], tmp_path, "z",
                                       *([f"train.halt_at_step={halt}"] if halt else [])))
        said += [x for x in proc.stdout.splitlines() if x.startswith(("resuming step", "converting"))]
    run = tmp_path / "z"
    how = (f"its ZeRO-{name[14]} shards are converted to DeepSpeed's universal checkpoint, which partitions the weights, "
           "fp32 masters and Adam moments anew" if name.startswith("deepspeed") else "the full state loads anywhere")
    how += ", and the batch order and global batch do not depend on the number of ranks"
    converting = [f"converting step-00000{step}'s ZeRO shards to a universal checkpoint ({run / 'universal'})"
                  for step in (4, 8)] if name.startswith("deepspeed") else ["", ""]
    assert said == [x for x in (f"resuming step 4 written by 2 rank(s) on 1: {how}", converting[0],
                                f"resuming step 8 written by 1 rank(s) on 2: {how}", converting[1]) if x]
    assert not (run / "universal").exists()  # each conversion removed once every rank loaded it
    steps, losses = metric_steps(tmp_path, "train/loss")
    ref_steps, ref_losses = metric_steps(reference[0], "train/loss")
    assert steps == ref_steps == list(range(1, 13))
    assert losses[4] == pytest.approx(ref_losses[4], abs=1e-6) and losses[8] == pytest.approx(ref_losses[8], abs=1e-6)
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.data.params["resumed_at_4.world_size"] == "2 -> 1" and mlrun.data.params["resumed_at_8.world_size"] == "1 -> 2"
    assert max_diff(weights(run), weights(reference[1])) < TOL


_SHORT = ["train.max_steps=4", "checkpoint.every_steps=2", "eval.every_steps=0"]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """One process, 4 steps: the weights ZeRO-1 and offloaded ZeRO-3 on 2 ranks must give."""
    out = tmp_path_factory.mktemp("four")
    check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "ref", *FAST, *STEPS, *_SHORT, *NO_MLFLOW))
    return out / "ref"


@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero3_offload"])
def test_zero1_and_offload_start_step_and_save(name, tmp_path, four_steps):
    """Offload swaps in DeepSpeed's CPU Adam, a C++ op built on first use (about 70 s on
    2 cores, then cached in the suite's build/torch_extensions). Both end at a one-process run's
    weights."""
    proc = check(accelerate_launch(["--config_file", str(ACCEL / f"{name}.yaml"), "--num_processes", "2"], tmp_path, "z",
                                   *_SHORT))
    assert "(2 process(es) on 1 node(s), DEEPSPEED" in proc.stdout
    run = tmp_path / "z"
    check_ranks(run)
    for step in ("step-000002", "step-000004"):
        files = {p.name for p in (run / "checkpoints" / step / "pytorch_model").iterdir()}
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    assert metric_steps(tmp_path, "train/loss")[0] == [1, 2, 3, 4]
    assert max_diff(weights(run), weights(four_steps)) < TOL


def test_two_node_rendezvous_on_one_machine(tmp_path, reference):
    """2 machines x 1 process, static rendezvous on 127.0.0.1: the multi-node path, rehearsed."""
    port = free_port()
    procs = [accelerate_launch(["--config_file", str(ACCEL / "multi_node.yaml"), "--num_machines", "2",
                                "--num_processes", "2", "--machine_rank", str(r), "--main_process_ip", "127.0.0.1"],
                               tmp_path, "nodes", port=port, wait=False) for r in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
    assert "(2 process(es) on 2 node(s), MULTI_CPU" in outs[0][0]
    facts = check_ranks(tmp_path / "nodes")
    assert [f["node_rank"] for f in facts] == [0, 1] and [f["local_rank"] for f in facts] == [0, 0]
    assert all(f["num_nodes"] == 2 for f in facts)
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.data.tags["num_nodes"] == "2"
    assert max_diff(weights(tmp_path / "nodes"), weights(reference[1])) < TOL


def _classes_file(path: Path, n: int, seed: int) -> Path:
    """Rows of 3 classes, each named by a word in its text (so the model has something to learn)."""
    from launcher.data import synthetic

    names = ("refund", "liability", "jurisdiction")
    rows = [{"text": f"{names[i % 3]} {r['text']}", "label": names[i % 3]} for i, r in enumerate(synthetic.generate_clauses(n, seed))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("accel,mode", [("cpu_ddp", "multiclass"), ("deepspeed_zero2", "multilabel")])
def test_multiclass_and_multilabel_on_two_ranks_equal_one_process(accel, mode, tmp_path):
    """Every other 2-rank classification run is binary. A 3-class file (DDP) and the 8-label
    clauses with their cuts tuned on validation (ZeRO-2), both with balanced class weights: the
    same weights as one process, every validation row counted once, and the same metrics for
    every class, loss and tuned cuts."""
    extra = ["train.class_weighting=balanced", f"data.mode={mode}"]
    if mode == "multiclass":
        extra += ["data.synthetic.enabled=false", "data.label_names=[refund,liability,jurisdiction]",
                  f"data.train_file={_classes_file(tmp_path / 'train.jsonl', 384, 0)}",
                  f"data.validation_file={_classes_file(tmp_path / 'validation.jsonl', 100, 1)}"]
    else:
        extra += ["eval.tune_threshold=true"]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "ref"), "--run-name", "cls", *FAST, *STEPS, *extra))
    proc = check(accelerate_launch(["--config_file", str(ACCEL / f"{accel}.yaml"), "--num_processes", "2"],
                                   tmp_path, "cls", *extra))
    assert proc.stdout.count("run directory:") == 1
    run, ref = tmp_path / "cls", tmp_path / "ref" / "cls"
    check_ranks(run)
    assert max_diff(weights(run), weights(ref)) < TOL
    final, ref_final = (json.loads((d / "final_metrics.json").read_text())["after"] for d in (run, ref))
    assert final["n"] == ref_final["n"] == 100
    per_class = [k for k in final if k.startswith("f1/") and not k.endswith("@0.5")]  # (the 0.5 rule beside a tuned one)
    assert len(per_class) == (3 if mode == "multiclass" else 9) and final.keys() == ref_final.keys()  # (9: "none")
    for key in final:
        assert final[key] == pytest.approx(ref_final[key], abs=1e-5), key
    cuts, ref_cuts = (json.loads((d / "model" / "launcher.json").read_text())["threshold"] for d in (run, ref))
    if mode == "multilabel":
        assert isinstance(cuts, dict) and "decision threshold tuned on validation" in proc.stdout
        assert cuts.keys() == ref_cuts.keys() and all(cuts[k] == pytest.approx(ref_cuts[k], abs=1e-5) for k in cuts)
    check_export_predicts_like_the_run(run, tmp_path / "validation.jsonl" if mode == "multiclass" else None)


@pytest.mark.parametrize("accel,extra", [("cpu_ddp", ["data.packing=true"]), ("deepspeed_zero3", ["model.lora.enabled=true"]),
                                         # (make test-matrix: ZeRO-3 trains the full model to one process's
                                         # weights in the chunked-loss test below, packed rows on 2 ranks above)
                                         pytest.param("deepspeed_zero3", ["data.packing=true"], marks=pytest.mark.matrix)],
                         ids=["ddp-packed-full", "zero3-lora", "zero3-packed-full"])
def test_sft_on_two_ranks_equals_one_process(accel, extra, tmp_path):
    """The causal-LM task through the same engines: same weights and generations as one
    process; under ZeRO-3 the LoRA adapter is exported whole (not the empty file other
    tools write when they save a sharded PeftModel)."""
    check(launcher("train", str(SFT), "--output-dir", str(tmp_path / "ref"), "--run-name", "sft", *SFT_FAST, *extra))
    proc = check(accelerate_launch(["--config_file", str(ACCEL / f"{accel}.yaml"), "--num_processes", "2"],
                                   tmp_path, "sft", *extra, config=SFT, base=SFT_FAST))
    assert proc.stdout.count("run directory:") == 1
    run, ref = tmp_path / "sft", tmp_path / "ref" / "sft"
    check_ranks(run)
    assert metric_steps(tmp_path, "train/loss")[0] == list(range(1, 9))
    assert max_diff(weights(run), weights(ref)) < TOL
    gens = lambda d: (d / "generations.jsonl").read_text()  # noqa: E731
    assert gens(run) == gens(ref) and "[8] " in proc.stdout  # generated on every rank in step, printed once
    # ZeRO-3 gathers the whole model once around evaluation (deepspeed's unwrap_model_for_generation):
    # the same answers, and the shards come back for the steps after it (eval every 4 steps).
    assert ("evaluation gathers the whole model once" in proc.stdout) == (accel == "deepspeed_zero3")
    # Generation-based evaluation: each rank answered its share of the validation rows; gathered,
    # every row is there once, with the answers and scores one process gives.
    final, ref_final = (json.loads((d / "final_metrics.json").read_text()) for d in (run, ref))
    for key in ("exact_match", "choice_accuracy", "choice_macro_f1", "n"):
        assert final["after"][key] == pytest.approx(ref_final["after"][key], abs=1e-6), key
    assert final["after"]["loss"] == pytest.approx(ref_final["after"]["loss"], rel=1e-4)
    rows = [json.loads(x) for x in (run / "predictions" / "step-000008.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "predictions" / "step-000008.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(final["after"]["n"])) and rows == ref_rows
    if "model.lora.enabled=true" in extra:
        adapter = _adapter(run)
        assert adapter and all(v.numel() > 0 for v in adapter.values())
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
        assert max_diff(adapter, _adapter(ref)) < TOL


@pytest.fixture(scope="module")
def sft_own_loss(tmp_path_factory) -> Path:
    """One process of the SFT test config with the model's own loss (the output directory)."""
    out = tmp_path_factory.mktemp("own-loss")
    check(launcher("train", str(SFT), "--output-dir", str(out), "--run-name", "sft", *SFT_FAST, "train.loss_chunk_tokens=0"))
    return out


@pytest.mark.parametrize("accel", ["deepspeed_zero3", "fsdp2"])
def test_the_chunked_loss_on_sharded_engines_equals_the_models_own_loss(accel, tmp_path, sft_own_loss):
    """ZeRO-3 and FSDP2 hold the output head's weight whole only while its module runs; the
    chunked loss runs there (lean_loss.head_computes_loss), its gradients made in the forward
    pass. Two ranks with the chunked loss (chunks of 7 tokens, so chunks straddle rows) train
    the weights, and evaluate the loss, that one process gives with the model's own loss; each
    export says which loss trained it."""
    ref_dir = sft_own_loss
    proc = check(accelerate_launch(["--config_file", str(ACCEL / f"{accel}.yaml"), "--num_processes", "2"],
                                   tmp_path, "sft", "train.loss_chunk_tokens=7", config=SFT, base=SFT_FAST))
    run, ref = tmp_path / "sft", ref_dir / "sft"
    assert "loss_chunk_tokens" not in proc.stdout + proc.stderr  # the self-check passed on every rank
    meta = lambda d: json.loads((d / "model" / "launcher.json").read_text())  # noqa: E731
    assert meta(run)["train_loss"] == "chunked" and meta(ref)["train_loss"] == "model"
    assert max_diff(weights(run), weights(ref)) < TOL
    for key in ("train/loss", "train/grad_norm"):  # Adam's steps would hide gradients scaled wrong; the norm does not
        assert metric_steps(tmp_path, key)[1] == pytest.approx(metric_steps(ref_dir, key)[1], rel=1e-4), key
    final, ref_final = (json.loads((d / "final_metrics.json").read_text()) for d in (run, ref))
    assert final["after"]["loss"] == pytest.approx(ref_final["after"]["loss"], rel=1e-4)


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "adapter" / "adapter_model.safetensors")


@pytest.mark.matrix
def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint_and_resumes(tmp_path, reference):
    """A scheduler's SIGTERM to the launcher: torchrun passes it to both ranks, they agree
    on one step, checkpoint it and exit; the same command then resumes to the same weights.
    make test-matrix: make test stops 2 ranks with a signal and resumes them to the reference
    weights in test_interrupt (two-ranks), sends the SIGTERM through launcher.launch there
    (ddp-SIGTERM), and through a raw accelerate launch below (a step longer than the grace)."""
    launch = ["--config_file", str(ACCEL / "cpu_ddp.yaml")]
    # (torchrun's grace after a SIGTERM is 30 s by default: the stop may take longer on a loaded machine)
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = accelerate_launch(launch, tmp_path, "sig", wait=False, stderr=sink,
                                 env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600", "LAUNCHER_STALL": "0:2:3"})
    deadline = time.time() + 300
    while "LAUNCHER_STALL: rank 0 sleeps" not in errors.read_text():  # both ranks train (a stop before is another test's)
        assert proc.poll() is None and time.time() < deadline, errors.read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    err = errors.read_text()
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "(SIGTERM)" in stopped[0], out[-3000:] + err[-3000:]
    step = int(stopped[0].split()[3])
    assert 1 <= step < 12
    ckpts = sorted(p.name for p in (tmp_path / "sig" / "checkpoints").iterdir())
    assert ckpts[-1] == f"step-{step:06d}" and (tmp_path / "sig" / "checkpoints" / ckpts[-1] / "COMPLETE").is_file()
    assert not (tmp_path / "sig" / "model").exists()

    resumed = check(accelerate_launch(launch, tmp_path, "sig"))
    assert f"resuming from {tmp_path / 'sig' / 'checkpoints' / ckpts[-1]}" in resumed.stdout
    assert metric_steps(tmp_path, "train/loss")[0] == list(range(1, 13))
    assert max_diff(weights(tmp_path / "sig"), weights(reference[1])) < TOL


def test_sigterm_with_a_step_longer_than_the_grace_says_how_far_back_the_resume_goes(tmp_path, reference):
    """torchrun SIGKILLs the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after it forwards a
    SIGTERM (10 s here: rank 0 has that long to say so, even on a loaded machine; 30 by default). Rank 0 stalls an hour inside step 7, so the stop at the end
    of that step never comes: the moment the signal arrives, rank 0 says the resume goes back to
    step 6, the last sealed checkpoint, and the resume (on one process) does exactly that."""
    launch = ["--config_file", str(ACCEL / "cpu_ddp.yaml")]
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10", "LAUNCHER_STALL": "0:7:3600"}
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = accelerate_launch(launch, tmp_path, "grace", wait=False, env=env, stderr=sink)
    deadline = time.time() + 300
    while "LAUNCHER_STALL: rank 0 sleeps 3600 s at 7" not in errors.read_text():  # step 6 is sealed and noted
        assert proc.poll() is None and time.time() < deadline, errors.read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = communicate_or_kill(proc, 300)  # the stall lasts an hour: an exit at all is the kill
    err = errors.read_text()
    assert proc.returncode != 0, (out[-3000:], err[-3000:])  # killed, not stopped
    said = [line for line in err.splitlines() if line.startswith("launcher: SIGTERM")]
    assert said == ["launcher: SIGTERM: every rank checkpoints at the end of the step in progress and exits; if they "
                    "are killed before that within 10 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), the resume goes back to "
                    "step 6 (checkpoints/step-000006)"], err[-3000:]
    assert not any(line.startswith("stopped at step") for line in out.splitlines())
    assert sorted(p.name for p in (tmp_path / "grace" / "checkpoints").iterdir() if not p.name.startswith(".")) \
        == ["step-000006"]

    # The requeue lands on one process: a full (DDP) state loads anywhere, and the batch order
    # and global batch do not depend on the number of ranks, so the run still ends exactly.
    resumed = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "grace", *FAST, *STEPS))
    assert f"resuming from {tmp_path / 'grace' / 'checkpoints' / 'step-000006'}" in resumed.stdout
    assert "resuming step 6 written by 2 rank(s) on 1: the full state loads anywhere" in resumed.stdout
    assert metric_steps(tmp_path, "train/loss")[0] == list(range(1, 13))  # each step once, none lost
    assert max_diff(weights(tmp_path / "grace"), weights(reference[1])) < TOL
    (mlrun,) = all_runs(mlflow_client(tmp_path))  # the same run records the move
    assert mlrun.data.params["resumed_at_6.world_size"] == "2 -> 1" and mlrun.data.params["derived.world_size"] == "2"


def test_an_odd_step_of_two_ranks_resumes_on_one_process_exactly(tmp_path, reference):
    """2 ranks x 1 micro-batch halted at step 3, resumed as 1 process x 2 accumulated: the
    accumulation boundaries are the new world's (accelerate restores its micro-batch counter
    as the writer counted it: 3, odd, stepped the optimizer after every half-batch). The first
    loss after the resume is the uninterrupted run's at that step, and so are the weights."""
    check(accelerate_launch(["--config_file", str(ACCEL / "cpu_ddp.yaml")], tmp_path, "odd", "train.halt_at_step=3"))
    resumed = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "odd", *FAST, *STEPS))
    assert "resuming step 3 written by 2 rank(s) on 1" in resumed.stdout
    steps, losses = metric_steps(tmp_path, "train/loss")
    ref_steps, ref_losses = metric_steps(reference[0], "train/loss")
    assert steps == ref_steps == list(range(1, 13))
    assert losses[3] == pytest.approx(ref_losses[3], abs=1e-6)  # step 4: the first after the resume
    assert max_diff(weights(tmp_path / "odd"), weights(reference[1])) < TOL


def test_contradiction_stops_every_rank_before_a_process_group(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({**json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text()),
                                                  "bf16": {"enabled": True}}))
    yaml_file = tmp_path / "accel.yaml"
    yaml_file.write_text(f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n"
                         f"  deepspeed_config_file: {tmp_path / 'ds.json'}\n")
    proc = accelerate_launch(["--config_file", str(yaml_file)], tmp_path, "bad")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'ds.json'}: bf16.enabled: true but train.precision is no; use \"auto\""], \
        proc.stderr[-3000:]
    assert not (tmp_path / "bad").exists()


def test_fsdp2_halted_and_resumed_equals_one_uninterrupted_process(tmp_path):
    """FSDP2 (fully_shard) on 2 gloo ranks, the shipped fsdp2.yaml unchanged: accelerate
    enables FSDP only for GPU process groups, launcher switches it on for CPU (engines.cpu_fsdp2).
    Micro-batches of 8: 2 accumulated micro-batches per rank, reduce-scattered after each
    (sync_each_batch), against one process accumulating 2 x 16. Halted at 4, resumed from
    the DCP checkpoint on 4 ranks (one thread each) and halted at 8, then resumed on 2 to step
    12: DCP reshards the model and the optimizer state both ways (a re-initialised Adam would
    not end at these weights): the same weights as the uninterrupted process, and the same
    first loss after each resume. Dropout off: its masks are drawn per micro-batch, and the
    micro-batches differ here."""
    knobs = ["model.tiny.dropout=0"]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "one"), "--run-name", "ref", *FAST, *STEPS, *knobs))
    reference = tmp_path / "one", tmp_path / "one" / "ref"
    launch = ["--config_file", str(ACCEL / "fsdp2.yaml"), "--num_processes", "2"]
    first = check(accelerate_launch(launch, tmp_path, "f", "train.halt_at_step=4", "train.micro_batch_size=8", *knobs))
    assert "(2 process(es) on 1 node(s), FSDP" in first.stdout and "8 x 2 accumulation x 2 ranks" in first.stdout
    line = next(x for x in first.stdout.splitlines() if x.startswith("FSDP2: parameters held per rank"))
    held, total = line.rsplit(": ", 1)[1].split(" of ")
    held, total = [int(x.replace(",", "")) for x in held.split(" / ")], int(total.replace(",", ""))
    assert len(held) == 2 and all(h < total for h in held) and sum(held) >= total  # really sharded
    run = tmp_path / "f"
    dcp = run / "checkpoints" / "step-000004" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in dcp.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard file per rank

    four = ["--config_file", str(ACCEL / "fsdp2.yaml"), "--num_processes", "4"]
    second = check(accelerate_launch(four, tmp_path, "f", "train.halt_at_step=8", "train.micro_batch_size=8", *knobs,
                                     env={"OMP_NUM_THREADS": "1"}))
    assert f"resuming from {run / 'checkpoints' / 'step-000004'}" in second.stdout
    assert "resuming step 4 written by 2 rank(s) on 4: DCP reshards the FSDP2 model and optimizer state" in second.stdout
    check_ranks(run, 4)
    third = check(accelerate_launch(launch, tmp_path, "f", "train.micro_batch_size=8", *knobs))
    assert "resuming step 8 written by 4 rank(s) on 2: DCP reshards the FSDP2 model and optimizer state" in third.stdout
    steps, losses = metric_steps(tmp_path, "train/loss")
    ref_losses = metric_steps(reference[0], "train/loss")[1]
    assert steps == list(range(1, 13))
    assert losses[4] == pytest.approx(ref_losses[4], abs=1e-6) and losses[8] == pytest.approx(ref_losses[8], abs=1e-6)
    assert metric_steps(tmp_path, "train/grad_norm")[1] == pytest.approx(metric_steps(reference[0], "train/grad_norm")[1], rel=1e-4)
    assert max_diff(weights(run), weights(reference[1])) < TOL
    check_export_predicts_like_the_run(run)
    # The offline export reads the DCP shards: the same model as one process's last checkpoint.
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    proc = check(launcher("export", str(run / "checkpoints" / "step-000012"), str(mine)))
    assert "FSDP sharded state dict" in proc.stdout
    check(launcher("export", str(reference[1] / "checkpoints" / "step-000012"), str(theirs)))
    assert max_diff(load_model_weights(mine), load_model_weights(theirs)) < TOL


def test_a_save_failing_on_one_rank_ends_the_job_with_its_error_not_a_wait_for_the_timeout(tmp_path):
    """Rank 1's save of step 1 fails (not for want of disk) while rank 0 is inside DCP's
    collectives. Comparing notes would leave both waiting until the collective timeout (here
    120 s) and then report only the timeout; rank 1 must stop at once with its own error.
    Nothing of step 1 is sealed."""
    launch = ["--config_file", str(ACCEL / "fsdp2.yaml"), "--num_processes", "2"]
    proc = accelerate_launch(launch, tmp_path, "f", "train.max_steps=2", "checkpoint.every_steps=1", "eval.every_steps=0",
                             "train.collective_timeout_s=120", "train.hang_timeout_s=0", env={"LAUNCHER_SAVE_ERROR": "1:1"},
                             base=FAST)
    assert proc.returncode != 0
    assert "RuntimeError: injected save failure (LAUNCHER_SAVE_ERROR) on rank 1 at step 1" in proc.stderr
    # torchrun SIGTERMs rank 0 once rank 1 has failed; rank 0's line about that names torchrun's
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which is not a collective timeout.
    # Traceback frames are left out: rank 0, SIGTERMed wherever it is, may show a frame of code
    # that names a `timeout` argument (threading's Condition.wait); a timeout's message is no frame.
    frame = re.compile(r"^(\[rank\d+\]: )?  +\S")  # a frame's lines are indented; a message's are not
    said = "\n".join(x for x in proc.stderr.splitlines()
                     if not x.startswith("launcher: SIGTERM") and not frame.match(x)).lower()
    assert "timed out" not in said and "timeout" not in said, proc.stderr[-3000:]
    checkpoints = tmp_path / "f" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [".tmp-step-000001"]  # unsealed: never resumed from


def test_a_full_disk_on_one_rank_under_deepspeed_is_one_line_not_a_wait_in_its_barrier(tmp_path):
    """Out of disk on rank 1 alone (a node's own scratch, a quota) while rank 0 saves its ZeRO
    shards: rank 0 waits in DeepSpeed's own collectives, and rank 1 comparing notes met them with
    another collective (a hang until the collective timeout, or a crash). Rank 1 now says it in
    the disk error's one line and stops; nothing of step 1 is sealed."""
    launch = ["--config_file", str(ACCEL / "deepspeed_zero2.yaml"), "--num_processes", "2"]
    proc = accelerate_launch(launch, tmp_path, "z", "train.max_steps=2", "checkpoint.every_steps=1", "eval.every_steps=0",
                             "train.collective_timeout_s=120", "train.hang_timeout_s=0",
                             env={"LAUNCHER_SAVE_ERROR": "1:1:disk"}, base=FAST)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if "error: checkpoint at step 1 not written" in x]
    assert errors and all("rank 1: OSError: [Errno 28] No space left on device (injected" in x for x in errors), \
        proc.stderr[-3000:]
    assert "timed out" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert not [p for p in (tmp_path / "z" / "checkpoints").iterdir() if not p.name.startswith(".tmp-")]


def test_fsdp1_is_refused_on_cpu_rather_than_silently_run_as_ddp(tmp_path):
    proc = accelerate_launch(["--config_file", str(ACCEL / "fsdp1.yaml"), "--num_processes", "2"], tmp_path, "fsdp")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "FSDP1 needs CUDA GPUs" in errors[0]
    assert not (tmp_path / "fsdp").exists()


def test_stack_fact_multi_cpu_yaml_starts_one_process(tmp_path):
    """Why cpu_ddp.yaml says MULTI_GPU: accelerate 1.15 starts ONE process for MULTI_CPU/use_cpu."""
    script = tmp_path / "who.py"
    script.write_text("import os\nprint('WORLD', os.environ.get('WORLD_SIZE'))\n")
    yaml_file = tmp_path / "multi_cpu.yaml"
    yaml_file.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\nuse_cpu: true\n")
    proc = check(subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                                 str(yaml_file), str(script)], capture_output=True, text=True, timeout=120))
    assert proc.stdout.count("WORLD") == 1
