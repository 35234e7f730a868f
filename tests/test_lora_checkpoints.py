"""LoRA on a pretrained base: checkpoints hold only what trains (adapters and the head) plus
the optimizer and schedule; a halted run resumes to the weights of an uninterrupted one
(the frozen base is read again from model.name), in one process and under ZeRO-2 and
ZeRO-3 and FSDP2 on 2 ranks, and under ZeRO-3 on another number of ranks; `launcher export` of such a checkpoint reads the base from the same place."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, check, launcher
from test_distributed import ACCEL, TOL, accelerate_launch, load_model_weights, max_diff, metric_steps, weights
from test_pretrained import saved_models  # noqa: F401 - the fixture: a tiny BERT and Llama, save_pretrained

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = ["train.max_steps=12", "eval.every_steps=6", "checkpoint.every_steps=6", "checkpoint.export=last",
         "data.synthetic.n_train=192", "data.synthetic.n_validation=32", "data.max_length=64"]


@pytest.fixture(scope="module")
def lora_args(saved_models):  # noqa: F811
    return [f"model.name={saved_models / 'bert'}", "model.lora.enabled=true", *STEPS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, lora_args):
    out = tmp_path_factory.mktemp("ref")
    check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "ref", *lora_args))
    return out / "ref"


def _checkpoint_keys(ckpt) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_one_process_checkpoint_holds_only_trained_weights_and_resumes_exactly(tmp_path, uninterrupted, lora_args):
    keys = _checkpoint_keys(uninterrupted / "checkpoints" / "step-000012")
    assert keys and all("lora_" in k or "modules_to_save" in k or k.endswith("_ids") for k in keys), keys
    assert any("lora_A" in k for k in keys) and any("modules_to_save" in k for k in keys)
    base_bytes = (uninterrupted / "model" / "model.safetensors").stat().st_size
    assert (uninterrupted / "checkpoints" / "step-000012" / "model.safetensors").stat().st_size < base_bytes / 4
    meta = json.loads((uninterrupted / "checkpoints" / "step-000012" / "skeleton" / "launcher.json").read_text())
    assert meta["checkpoint_weights"] == "trainable" and meta["base_model"] == lora_args[0].split("=", 1)[1]

    halted = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "h", *lora_args,
                            "train.halt_at_step=6"))
    assert "stopped at step 6" in halted.stdout
    resumed = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "h", *lora_args))
    assert "resuming from" in resumed.stdout
    assert max_diff(weights(tmp_path / "h"), weights(uninterrupted)) < 1e-6

    # `launcher export` of the trainable-only checkpoint: the base from model.name, the adapter from the checkpoint
    check(launcher("export", str(uninterrupted / "checkpoints" / "step-000012"), str(tmp_path / "exported")))
    assert max_diff(load_model_weights(tmp_path / "exported"), weights(uninterrupted)) < 1e-6


def test_launcher_export_of_a_bf16_lora_checkpoint_is_the_runs_export_bit_for_bit(tmp_path, lora_args):
    """Under bf16 the frozen base is held in bf16 and the adapters and head in fp32, and the
    checkpoint's config says bfloat16. `launcher export` reads the base again in bf16, as the run
    held it, and the head and adapters as trained: the run's export, bit for bit. Before, the fp32
    head went through the bf16 base's copy of it and came out rounded (1e-4 apart)."""
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "b", *lora_args, "train.precision=bf16"))
    run = tmp_path / "b"
    check(launcher("export", str(run / "checkpoints" / "step-000012"), str(tmp_path / "exported")))
    ours, theirs = load_model_weights(tmp_path / "exported"), load_model_weights(run / "model")
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not ours[k].equal(theirs[k])] == []
    heads = [k for k in ours if k.startswith("classifier")]
    assert heads and all(ours[k].dtype == theirs[k].dtype for k in ours)
    # Both adapters name the base as model.name gave it (peft wrote the checkpoint's skeleton,
    # rotated away later, from launcher export), and each module to save once.
    configs = [json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (tmp_path / "exported", run / "model")]
    assert configs[0] == configs[1]
    assert configs[0]["base_model_name_or_path"] == lora_args[0].split("=", 1)[1]
    assert len(configs[0]["modules_to_save"]) == len(set(configs[0]["modules_to_save"])) > 0


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.matrix), 3])
def test_zero_lora_checkpoint_holds_no_frozen_base_and_resumes_to_one_process(stage, tmp_path, uninterrupted, lora_args):
    launch = ["--config_file", str(ACCEL / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2"]
    halted = accelerate_launch(launch, tmp_path, "z", *lora_args, "train.halt_at_step=6", base=[])
    assert halted.returncode == 0 and "stopped at step 6" in halted.stdout, halted.stderr[-3000:]
    states = list((tmp_path / "z" / "checkpoints" / "step-000006").rglob("*model_states.pt"))
    assert states
    import torch

    state = torch.load(states[0], weights_only=False)
    module = state["module"] or {}
    assert module and all("lora_" in k or "modules_to_save" in k for k in module), list(module)[:5]
    assert not state.get("frozen_param_fragments")  # DeepSpeed's copy of the frozen base: excluded
    resumed = check(accelerate_launch(launch, tmp_path, "z", *lora_args, base=[]))
    assert "resuming from" in resumed.stdout
    assert max_diff(weights(tmp_path / "z"), weights(uninterrupted)) < TOL
    # offline export of the ZeRO shards: adapter and head from them, the frozen base from model.name
    check(launcher("export", str(tmp_path / "z" / "checkpoints" / "step-000012"), str(tmp_path / "exported")))
    assert max_diff(load_model_weights(tmp_path / "exported"), weights(tmp_path / "z")) < 1e-6


def test_fsdp2_lora_checkpoint_holds_no_frozen_base_and_resumes_to_one_process(tmp_path, uninterrupted, lora_args):
    """FSDP2 saves through DCP: the shards hold the adapters, the head and buffers, not the base."""
    from torch.distributed.checkpoint import FileSystemReader

    launch = ["--config_file", str(ACCEL / "fsdp2.yaml"), "--num_processes", "2"]
    halted = check(accelerate_launch(launch, tmp_path, "f", *lora_args, "train.halt_at_step=6", base=[]))
    assert "stopped at step 6" in halted.stdout
    dcp = tmp_path / "f" / "checkpoints" / "step-000006" / "pytorch_model_fsdp_0"
    keys = list(FileSystemReader(str(dcp)).read_metadata().state_dict_metadata)
    assert any("lora_A" in k for k in keys) and any("modules_to_save" in k for k in keys)
    assert all("lora_" in k or "modules_to_save" in k or k.endswith("_ids") for k in keys), keys
    resumed = check(accelerate_launch(launch, tmp_path, "f", *lora_args, base=[]))
    assert "resuming from" in resumed.stdout
    assert max_diff(weights(tmp_path / "f"), weights(uninterrupted)) < TOL
    check(launcher("export", str(tmp_path / "f" / "checkpoints" / "step-000012"), str(tmp_path / "exported")))
    assert max_diff(load_model_weights(tmp_path / "exported"), weights(tmp_path / "f")) < 1e-6


@pytest.mark.matrix  # the conversion itself runs in make test (test_distributed, ZeRO-2 and ZeRO-3)
def test_zero3_lora_checkpoint_resumes_on_another_number_of_ranks(tmp_path, uninterrupted, lora_args):
    """ZeRO-3 with LoRA on a pretrained base in three attempts: 2 ranks halt at step 4, 1 rank
    at 8, 2 ranks end at 12. The trainable-only shards (adapters and head, their fp32 masters
    and Adam moments) are converted to DeepSpeed's universal checkpoint at each change of the
    number of ranks; the frozen base is read from model.name as at any resume. The weights end
    equal to the uninterrupted one-process run's, and the first loss after each resume is its loss
    at that step."""
    config = ["--config_file", str(ACCEL / "deepspeed_zero3.yaml")]
    said = []
    for world, halt in ((2, 4), (1, 8), (2, None)):
        proc = check(accelerate_launch(config + ["--num_processes", str(world)], tmp_path, "z", *lora_args,
                                       *([f"train.halt_at_step={halt}"] if halt else []), base=[]))
        said += [x.split(":")[0] for x in proc.stdout.splitlines() if x.startswith("resuming step")]
    assert said == ["resuming step 4 written by 2 rank(s) on 1", "resuming step 8 written by 1 rank(s) on 2"]
    assert not (tmp_path / "z" / "universal").exists()
    steps, losses = metric_steps(tmp_path, "train/loss")
    ref_steps, ref_losses = metric_steps(uninterrupted.parent, "train/loss")
    assert steps == ref_steps == list(range(1, 13))
    assert losses[4] == pytest.approx(ref_losses[4], abs=1e-6) and losses[8] == pytest.approx(ref_losses[8], abs=1e-6)
    assert max_diff(weights(tmp_path / "z"), weights(uninterrupted)) < TOL


def test_a_lora_checkpoint_is_merged_and_resumed_only_onto_the_base_it_was_trained_on(tmp_path, saved_models):  # noqa: F811
    """A checkpoint holding only what trained reads its base again from model.name as typed. From
    another directory, or with another model of the same shapes put there, `launcher export`
    merged the adapters onto that model without a word (exit 0, weights off by up to 2) and a
    resume trained them on it. The checkpoint now records the base's weights (a sampled digest,
    models.local_weights) and the absolute path they were read from."""
    import shutil

    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    shutil.copytree(saved_models / "bert", work / "base")
    train = ["train", str(TINY), "--output-dir", str(tmp_path / "out"), "--run-name", "r", "model.name=base",
             "model.lora.enabled=true", *STEPS]
    check(launcher(*train, "train.halt_at_step=6", cwd=work))
    ckpt = tmp_path / "out" / "r" / "checkpoints" / "step-000006"
    # From another directory the relative name leads nowhere: the recorded path holds the base.
    out = check(launcher("export", str(ckpt), str(tmp_path / "e1"), cwd=elsewhere)).stdout
    assert f"frozen base from {(work / 'base').resolve()}" in out, out

    torch.manual_seed(1)  # another model of the same shapes, where the base was
    BertForSequenceClassification(AutoConfig.from_pretrained(work / "base")).save_pretrained(work / "base")
    said = "base is not the frozen base this LoRA checkpoint was trained on (its weight files differ"
    read = f"; it was read from {(work / 'base').resolve()})"
    for proc, where, then in ((launcher("export", str(ckpt), str(tmp_path / "e2"), cwd=work), "launcher export", read),
                              (launcher(*train, cwd=work), "model.name", read),
                              (launcher("export", str(ckpt), str(tmp_path / "e3"), cwd=elsewhere), "launcher export",
                               f" (no weight files there now, and {(work / 'base').resolve()}, where the run read it: its "
                               "weight files differ)")):
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
        head = said if then is read else said.replace(" (its weight files differ", "")
        assert errors[0].startswith(f"error: {where}: {head}{then}: its adapters would be merged onto another model; "), errors[0]
    assert not (tmp_path / "e2").exists() and not (tmp_path / "out" / "r" / "model").exists()
    # Allowed, the adapters go on training on the other base (in a run of their own here), and
    # the run says so: it was taken without a word.
    forked = [a if a != "r" else "r2" for a in train]
    out = check(launcher(*forked, f"checkpoint.resume={ckpt}", "checkpoint.resume_changed=allow", cwd=work)).stdout
    assert f"note: model.name: {said}{read}: its adapters would be merged onto another model; " \
           "checkpoint.resume_changed=allow: the adapters go on training on this base" in out.splitlines(), out

    shutil.rmtree(work / "base")  # the run's base back: the resume goes on
    shutil.copytree(saved_models / "bert", work / "base")
    assert "resuming from" in check(launcher(*train, cwd=work)).stdout
