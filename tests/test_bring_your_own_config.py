"""Accelerate configs as users have them: TRL's examples/accelerate_configs set and what
`accelerate config` writes, launched on 2 CPU ranks where the engine runs on CPU and
validated where it cannot; the one-command form `launcher train --accelerate-config`;
precision with one owner; `launcher env`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher import distributed, engines
from launcher.cli import main
from launcher.config import load_config

from conftest import CONFIGS, FAST, TINY, check, launcher

COMMON = {"compute_environment": "LOCAL_MACHINE", "debug": False, "machine_rank": 0, "main_training_function": "main",
          "mixed_precision": "bf16", "num_machines": 1, "num_processes": 8, "rdzv_backend": "static",
          "same_network": True, "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False}
# The documented keys of TRL's examples/accelerate_configs, as users copy them.
TRL = {
    "single_gpu": {"distributed_type": "NO", "downcast_bf16": "no", "gpu_ids": "all", "num_processes": 1},
    "multi_gpu": {"distributed_type": "MULTI_GPU", "downcast_bf16": "no", "gpu_ids": "all"},
    "deepspeed_zero1": {"distributed_type": "DEEPSPEED", "downcast_bf16": "no", "deepspeed_config": {
        "deepspeed_multinode_launcher": "standard", "gradient_accumulation_steps": 1, "zero3_init_flag": False,
        "zero_stage": 1}},
    "deepspeed_zero2": {"distributed_type": "DEEPSPEED", "downcast_bf16": "no", "deepspeed_config": {
        "deepspeed_multinode_launcher": "standard", "offload_optimizer_device": "none", "offload_param_device": "none",
        "zero3_init_flag": False, "zero_stage": 2}},
    "deepspeed_zero3": {"distributed_type": "DEEPSPEED", "downcast_bf16": "no", "deepspeed_config": {
        "deepspeed_multinode_launcher": "standard", "offload_optimizer_device": "none", "offload_param_device": "none",
        "zero3_init_flag": True, "zero3_save_16bit_model": True, "zero_stage": 3}},
    "fsdp1": {"distributed_type": "FSDP", "downcast_bf16": "no", "fsdp_config": {
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_cpu_ram_efficient_loading": True, "fsdp_forward_prefetch": True, "fsdp_offload_params": False,
        "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_sync_module_states": True, "fsdp_use_orig_params": True}},
    "fsdp2": {"distributed_type": "FSDP", "downcast_bf16": "no", "fsdp_config": {
        "fsdp_activation_checkpointing": False, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": False, "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_version": 2}},
    # What `accelerate config` writes for several GPUs (no mixed precision chosen).
    "accelerate_default_multi_gpu": {"distributed_type": "MULTI_GPU", "downcast_bf16": "no", "enable_cpu_affinity": False,
                                     "gpu_ids": "all", "mixed_precision": "no"},
}
RUN = [*FAST, "train.max_steps=3", "eval.every_steps=0", "checkpoint.every_steps=0", "eval.at_start=false",
       "model.tiny.dropout=0"]


def write_yaml(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**COMMON, **TRL[name]}))
    return path


@pytest.mark.parametrize("name", sorted(TRL))
def test_every_common_config_validates_and_precision_is_adopted(tmp_path, name):
    """No precision in the run config: the YAML's mixed_precision is adopted, and said so."""
    launch = distributed.from_yaml(write_yaml(tmp_path, name), num_processes=2 if name != "single_gpu" else None)
    cfg = load_config(TINY, world_size=launch.num_processes)
    given = cfg.train.precision
    cfg_in = cfg
    cfg, note = distributed.adopt_precision(cfg, launch)
    assert cfg_in.train.precision == given  # adopted into a copy: nothing built from the given config goes stale
    assert cfg.explicit == cfg_in.explicit
    assert engines.launch_problems(cfg.train, cfg.model, launch) == []
    if TRL[name].get("mixed_precision", "bf16") == "bf16":
        assert cfg.train.precision == "bf16" and note.startswith("train.precision: bf16, adopted from")
    else:
        assert cfg.train.precision == "no" and note is None
    if name.startswith("deepspeed"):
        resolved, _ = engines.deepspeed_config(cfg.train, launch)
        assert resolved["zero_optimization"]["stage"] == int(name[-1]) and resolved["bf16"]["enabled"] is True


def test_an_explicit_precision_that_disagrees_is_one_line_and_exit_2(tmp_path, capsys):
    path = write_yaml(tmp_path, "deepspeed_zero2")
    code = main(["train", str(TINY), "--accelerate-config", str(path), "--num-processes", "2", "--output-dir",
                 str(tmp_path / "out"), "train.precision=no"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {path}: mixed_precision is bf16 but train.precision is no (the run config "
                                 "decides precision: remove it here or set train.precision)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--num-processes", "3"], "train.global_batch_size: 32 is not divisible by train.micro_batch_size (16) x world size (3) = 48; "
                               "no micro-batch size does on 3 ranks: use a number of ranks that divides it"),
    (["--num-processes", "2", "train.max_grad_norm=0.5"], None),  # fine: the inline block holds no clipping
    (["--nodes", "2"], "--nodes: more than one machine needs --machine-rank and --main-process-ip"),
])
def test_the_one_command_form_checks_before_any_rank_starts(tmp_path, capsys, args, message):
    path = write_yaml(tmp_path, "deepspeed_zero1")
    if message is None:  # validated; stop short of launching by pointing at a DeepSpeed JSON that contradicts
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
        data = yaml.safe_load(path.read_text())
        data["deepspeed_config"] = {"deepspeed_config_file": str(ds), "zero3_init_flag": False}
        path.write_text(yaml.safe_dump(data))
        message = f"{ds}: gradient_clipping: 1.0 but the run has 0.5 (train.max_grad_norm); use \"auto\""
    code = main(["train", str(TINY), "--accelerate-config", str(path), "--output-dir", str(tmp_path / "out"), *args])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


def test_fsdp1_and_single_process_fsdp2_are_refused_on_a_cpu_host_in_one_line(tmp_path, capsys):
    """FSDP2 runs on CPU ranks (test_distributed.py); FSDP1 and a one-process FSDP2 do not."""
    for name, n, message in (("fsdp1", "2", "FSDP1 needs CUDA GPUs"), ("fsdp2", "1", "FSDP2 on CPU needs 2 or more processes")):
        path = write_yaml(tmp_path, name)
        assert main(["train", str(TINY), "--accelerate-config", str(path), "--num-processes", n]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {path}: {message}")


def test_launch_flags_need_an_accelerate_config(capsys):
    assert main(["train", str(TINY), "--num-processes", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-processes: only with --accelerate-config"


def test_env_names_the_stack():
    proc = check(launcher("env"))
    for name in ("launcher", "python", "torch", "accelerate", "deepspeed", "transformers", "peft", "datasets", "mlflow", "slurm"):
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), name
    from importlib.metadata import version

    assert f"transformers  {version('transformers')}" in proc.stdout


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def _train_with_trl_config(tmp_path, name: str) -> None:
    from test_distributed import check_ranks

    proc = check(launcher("train", str(TINY), "--accelerate-config", str(write_yaml(tmp_path, name)),
                          "--num-processes", "2", "--output-dir", str(tmp_path), "--run-name", name, *RUN))
    assert proc.stdout.startswith(f"checked {TINY} with ") and "2 process(es) on 1 machine(s)" in proc.stdout
    assert "train.precision: bf16, adopted from" in proc.stdout and proc.stdout.count("run directory:") == 1
    check_ranks(tmp_path / name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.matrix
@pytest.mark.parametrize("name", ["multi_gpu", "deepspeed_zero1", "deepspeed_zero3"])
def test_more_trl_configs_train_on_two_cpu_ranks(tmp_path, name):
    """The engines themselves run in test_distributed.py; here only TRL's file form differs."""
    _train_with_trl_config(tmp_path, name)


@pytest.mark.slow
@pytest.mark.distributed
def test_trl_configs_train_on_two_cpu_ranks_and_inline_deepspeed_equals_the_json(tmp_path):
    """ZeRO-2 in TRL's inline form, through the one-command form on 2 CPU ranks (multi_gpu,
    ZeRO-1 and ZeRO-3: make test-matrix); it equals `accelerate launch` with our JSON-based YAML exactly."""
    from test_distributed import accelerate_launch

    _train_with_trl_config(tmp_path, "deepspeed_zero2")
    json_run = check(accelerate_launch(["--config_file", str(CONFIGS / "accelerate" / "deepspeed_zero2.yaml"),
                                        "--num_processes", "2"], tmp_path, "json", *RUN, "train.precision=bf16", base=[]))
    assert "DEEPSPEED" in json_run.stdout
    inline, from_json = _weights(tmp_path / "deepspeed_zero2"), _weights(tmp_path / "json")
    assert inline.keys() == from_json.keys() and all((inline[k] == from_json[k]).all() for k in inline)
    # accelerate's flags instead of a YAML keep working, and give the same run.
    flags = check(accelerate_launch(["--use_deepspeed", "--zero_stage", "2", "--num_processes", "2",
                                     "--mixed_precision", "bf16"], tmp_path, "flags", *RUN, base=[]))
    assert "DEEPSPEED" in flags.stdout and "train.precision: bf16, adopted from" in flags.stdout
    by_flags = _weights(tmp_path / "flags")
    assert max(float((by_flags[k].float() - from_json[k].float()).abs().max()) for k in by_flags) < 1e-6
    single = check(launcher("train", str(TINY), "--accelerate-config", str(write_yaml(tmp_path, "single_gpu")),
                            "--output-dir", str(tmp_path), "--run-name", "single", *RUN))
    assert "(1 process(es) on 1 node(s)" in single.stdout
