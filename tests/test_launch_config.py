"""Accelerate YAML x DeepSpeed JSON x run config: reading, the cross-file validator, "auto", plan.

Fast: no process group starts here. The multi-process runs are in test_distributed.py.
"""

from __future__ import annotations

import json

import pytest

from launcher import distributed, engines
from launcher.cli import main
from launcher.config import load_config
from launcher.plan import bytes_per_param

from conftest import CONFIGS, TINY

ACCEL = CONFIGS / "accelerate"
EXPECTED_YAMLS = {"cpu", "cpu_ddp", "single_gpu", "multi_gpu", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
                  "deepspeed_zero3_offload", "fsdp1", "fsdp2", "multi_node"}


def test_the_usual_set_of_accelerate_configs_ships():
    assert {p.stem for p in ACCEL.glob("*.yaml")} == EXPECTED_YAMLS
    assert {p.stem for p in (CONFIGS / "deepspeed").glob("*.json")} == {"zero1", "zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("name", sorted(EXPECTED_YAMLS))
def test_every_accelerate_config_agrees_with_the_tiny_run_on_two_processes(name, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # DeepSpeed JSON paths are relative to the repository root
    launch = distributed.from_yaml(ACCEL / f"{name}.yaml", num_processes=2 if name not in ("cpu", "single_gpu") else None)
    cfg = load_config(TINY, world_size=launch.num_processes)
    assert engines.launch_problems(cfg.train, cfg.model, launch) == []
    if name.startswith("deepspeed"):
        stage = int(name.removeprefix("deepspeed_zero")[0])
        assert launch.uses_deepspeed and launch.zero_stage == stage
        ds = launch.ds
        # Policy only: every number the run config owns is "auto".
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", key
        assert ds["bf16"]["enabled"] == "auto" and "optimizer" not in ds and "scheduler" not in ds
        if stage == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_auto_values_are_filled_from_the_run_config(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    launch = distributed.from_yaml(ACCEL / "deepspeed_zero2.yaml", num_processes=2)
    cfg = load_config(TINY, ["train.global_batch_size=64", "train.max_grad_norm=0.5", "train.precision=bf16"], world_size=2)
    ds, fills = engines.deepspeed_config(cfg.train, launch)
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2  # 64 / (16 x 2 processes)
    assert ds["train_batch_size"] == 64
    assert ds["gradient_clipping"] == 0.5  # not accelerate's own default of 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2  # policy untouched
    assert {k for k, _, _ in fills} >= {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"}
    # The engine policy: reduced and summed in fp32 (DeepSpeed's defaults: bf16), unless the JSON says.
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    off = load_config(TINY, ["train.global_batch_size=64", "train.precision=bf16", "train.reduce_in_fp32=false"], world_size=2)
    ds_off, _ = engines.deepspeed_config(off.train, launch)
    assert "communication_data_type" not in ds_off and "grad_accum_dtype" not in ds_off.get("data_types", {})


def _write(tmp_path, yaml_text: str, json_obj: dict | None = None):
    if json_obj is not None:
        (tmp_path / "ds.json").write_text(json.dumps(json_obj, indent=1))
    (tmp_path / "accel.yaml").write_text(yaml_text)
    return tmp_path / "accel.yaml"


def _ds(**changes) -> dict:
    base = json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())
    for dotted, value in changes.items():
        node = base
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return base


DS_YAML = "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: {json}\n"
CONTRADICTIONS = {
    "bf16 in JSON, fp32 run": (DS_YAML, _ds(bf16__enabled=True), [],
                               "{json}: bf16.enabled: true but train.precision is no; use \"auto\""),
    "micro batch disagrees": (DS_YAML, _ds(train_micro_batch_size_per_gpu=8), [],
                              "{json}: train_micro_batch_size_per_gpu: 8 but the run has 16 (train.micro_batch_size); use \"auto\""),
    "accumulation disagrees": (DS_YAML, _ds(gradient_accumulation_steps=4), [],
                               "{json}: gradient_accumulation_steps: 4 but the run has 1 (derived from train.global_batch_size "
                               "/ (train.micro_batch_size x 2 processes)); use \"auto\""),
    "ZeRO stage in YAML vs JSON": (DS_YAML + "  zero_stage: 3\n", _ds(), [],
                                   "{yaml}: deepspeed_config.zero_stage is 3 but {json} sets zero_optimization.stage to 2: "
                                   "keep it in the JSON only"),
    "offload without DeepSpeed": ("distributed_type: MULTI_GPU\nnum_processes: 2\ndeepspeed_config:\n  offload_optimizer_device: cpu\n",
                                  None, [], "{yaml}: deepspeed_config.offload_optimizer_device is cpu but distributed_type is "
                                  "MULTI_GPU: offload needs DeepSpeed (use deepspeed_zero3_offload.yaml)"),
    # An explicit train.precision that disagrees (an unset one adopts the YAML's: test_bring_your_own_config.py).
    "YAML precision vs run": ("distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: bf16\n", None, ["train.precision=no"],
                              "{yaml}: mixed_precision is bf16 but train.precision is no (the run config decides precision: "
                              "remove it here or set train.precision)"),
    "optimizer in JSON": (DS_YAML, _ds(optimizer={"type": "AdamW", "params": {"lr": 1e-4}}), [],
                          "{json}: optimizer: the run config owns this (train.lr / train.weight_decay); remove the section"),
    "param offload below stage 3": (DS_YAML, _ds(zero_optimization__offload_param={"device": "cpu"}), [],
                                    "{json}: zero_optimization.offload_param: parameter offload needs stage 3 (stage is 2)"),
    "ZeRO-3 without the 16-bit gather": (DS_YAML, _ds(zero_optimization__stage=3), [],
                                         "{json}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true "
                                         "under ZeRO-3: the final export gathers the whole model"),
    "MULTI_CPU starts one process": ("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n", None, [],
                                     "{yaml}: use_cpu: true with num_processes 2: accelerate launch starts ONE process; "
                                     "for CPU ranks use distributed_type: MULTI_GPU without use_cpu (as "
                                     "configs/accelerate/cpu_ddp.yaml does)"),
    "clipping disagrees": (DS_YAML, _ds(gradient_clipping=5.0), ["train.max_grad_norm=1.0"],
                           "{json}: gradient_clipping: 5.0 but the run has 1.0 (train.max_grad_norm); use \"auto\""),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_each_contradiction_is_one_line_naming_file_and_key(case, tmp_path, capsys):
    yaml_text, ds, overrides, expected = CONTRADICTIONS[case]
    accel = _write(tmp_path, yaml_text.format(json=tmp_path / "ds.json"), ds)
    code = main(["plan", str(TINY), "--accelerate-config", str(accel), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: " + expected.format(json=tmp_path / "ds.json", yaml=accel)]


def test_bad_json_is_reported_with_its_line(tmp_path, capsys):
    (tmp_path / "ds.json").write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {enabled: true}\n}\n')
    accel = _write(tmp_path, DS_YAML.format(json=tmp_path / "ds.json"))
    assert main(["plan", str(TINY), "--accelerate-config", str(accel)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'ds.json'}:3: invalid JSON: Expecting property name enclosed in double quotes"


def test_missing_json_names_the_yaml_key(tmp_path, capsys):
    accel = _write(tmp_path, DS_YAML.format(json=tmp_path / "nope.json"))
    assert main(["plan", str(TINY), "--accelerate-config", str(accel)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {accel}: deepspeed_config.deepspeed_config_file: {tmp_path / 'nope.json'}: file not found "
        "(relative paths are read from the working directory)")


def test_environment_reader_sees_what_the_yaml_reader_sees(tmp_path):
    """Inside `accelerate launch` the YAML is gone; its values arrive as variables. Same verdict."""
    (tmp_path / "ds.json").write_text(json.dumps(_ds(zero_optimization__stage=3)))
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json"), "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero_stage", "ACCELERATE_MIXED_PRECISION": "no"}
    launch = distributed.from_env(env)
    assert launch.uses_deepspeed and launch.num_processes == 2 and launch.zero_stage == 3
    cfg = load_config(TINY, world_size=2)
    problems = distributed.check(cfg.train, cfg.model, launch)
    assert any("deepspeed_config.zero_stage is 2 but" in p and "zero_optimization.stage to 3" in p for p in problems)


def test_bytes_per_parameter_match_the_zero_paper():
    """ZeRO (Rajbhandari et al. 2020), Figure 1: 7.5B parameters, Adam with mixed precision
    (K=12), 64 GPUs: 120 GB baseline, 31.4 GB (P_os), 16.6 GB (P_os+g), 1.9 GB (P_os+g+p)."""
    psi, n = 7.5e9, 64
    expected_gb = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected_gb.items():
        gpu, host = bytes_per_param(stage, n, sixteen_bit=True)
        assert psi * gpu.total / 1e9 == pytest.approx(gb, abs=0.05), stage
        assert host.total == 0
    gpu, host = bytes_per_param(3, n, sixteen_bit=True, offload_optimizer=True, offload_params=True)
    assert gpu.total == pytest.approx(2 / n) and host.total == pytest.approx(14 / n)  # only grads stay
    assert bytes_per_param(0, 1, sixteen_bit=False)[0].total == 16  # fp32 Adam: 4 + 4 + 8


def test_plan_prints_world_batch_autos_memory_and_command(capsys, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    code = main(["plan", str(TINY), "--accelerate-config", "configs/accelerate/deepspeed_zero3.yaml",
                 "--nodes", "2", "--gpus-per-node", "8", "train.micro_batch_size=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "DeepSpeed ZeRO-3, 2 node(s) x 8 process(es) = world size 16" in out
    assert "global 32 = micro 2 x accumulation 1 x 16 process(es)" in out
    assert "1,600 rows (synthetic) / 32 = 50 steps per epoch; 3 epochs -> 150 optimizer steps" in out
    assert "train_micro_batch_size_per_gpu" in out and "= 2  (train.micro_batch_size)" in out
    assert "gradient_clipping" in out and "= 1.0  (train.max_grad_norm" in out
    # fp32 Adam over 16 ranks under ZeRO-3: (4 + 4 + 8) / 16 = 1 byte per parameter.
    assert "4/16    4/16    8/16        1" in out and "<- this run" in out
    assert ("accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_machines 2 "
            "--num_processes 16 --machine_rank $NODE_RANK --main_process_ip $HEAD_NODE") in out
    # and the Slurm form, which derives the same counts from the allocation
    assert ("ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3.yaml sbatch --nodes 2 --gpus-per-node 8 "
            "slurm/train.sh") in out
    assert "every rank checkpoints and stops SIGNAL_LEAD_S=600 s before the time limit" in out
    assert "(a checkpoint is about " in out and "CPUS_PER_NODE overrides" in out


def test_plan_refuses_a_world_size_the_global_batch_cannot_fill(capsys):
    assert main(["plan", str(TINY), "--nodes", "2", "--gpus-per-node", "8"]) == 2
    assert "train.global_batch_size: 32 is not divisible" in capsys.readouterr().err


def test_stack_fact_zero3_init_context_manager_does_not_turn_zero_init_off():
    """accelerate 1.15: `zero3_init_context_manager(enable=False)` leaves transformers in
    ZeRO-3 mode, so a model built inside it is still partitioned by zero.Init (whose random
    init differs from a single process's). runtime.model_init unsets the HF DeepSpeed config
    instead; the ZeRO-3 test in test_distributed.py shows the resulting weights match."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1},
                             zero3_init_flag=True)
    plugin.set_deepspeed_weakref()
    try:
        with plugin.zero3_init_context_manager(enable=False):
            assert is_deepspeed_zero3_enabled()
        unset_hf_deepspeed_config()
        assert not is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()


def test_readme_plan_example_is_what_plan_prints(tmp_path, capsys, monkeypatch):
    """The README's annotated example, regenerated: a bert-base-sized local config stands in for legal-bert."""
    from transformers import BertConfig

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("run        configs/train/clause_tos.yaml")
    shown = readme[start : readme.index("```", start)].rstrip("\n")
    model_dir = tmp_path / "legal-bert-base-uncased"
    BertConfig().save_pretrained(model_dir)
    monkeypatch.chdir(ROOT)
    assert main(["plan", "configs/train/clause_tos.yaml", "--accelerate-config", "configs/accelerate/deepspeed_zero3.yaml",
                 "--nodes", "2", "--gpus-per-node", "4", f"model.name={model_dir}", "train.micro_batch_size=1",
                 "train.precision=bf16"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").replace(str(model_dir), "/models/legal-bert-base-uncased")
    assert printed == shown


def test_plan_takes_the_run_directory_flags_of_train_and_prints_them_in_every_command(tmp_path, capsys):
    """`launcher plan` is the training command with train replaced by plan; --output-dir and
    --run-name were "unrecognized arguments" there, and missing from the commands it printed."""
    import shlex
    import subprocess
    import sys

    from launcher.cli import parse

    out = tmp_path / "my runs"
    assert main(["plan", str(TINY), "--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"),
                 "--output-dir", str(out), "--run-name", "r1", "train.lr=1e-4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    commands = [shlex.split(x) for x in printed[printed.index("command") + 1:] if not x.strip().startswith("(")]
    assert len(commands) == 3  # accelerate launch, launcher train --accelerate-config, sbatch slurm/train.sh
    for words in commands:
        if "slurm/train.sh" in words:  # the script's own variables (its stop directory goes beside the runs)
            shown = printed[printed.index("command") + 1:][2].strip()
            seen = "import os, sys; print(os.environ['OUTPUT_DIR'], os.environ['RUN_NAME'], *sys.argv[-2:], sep='|')"
            echoed = subprocess.run(["bash", "-c", shown.replace("sbatch", f"{sys.executable} -c {shlex.quote(seen)}", 1)],
                                    capture_output=True, text=True, check=True).stdout  # as the shell reads it
            assert echoed == f"{out}|r1|{TINY}|train.lr=1e-4\n"
            continue
        args = parse(words[words.index("launcher") + 1:])  # (launcher train ...)
        assert (args.output_dir, args.run_name, args.overrides) == (str(out), "r1", ["train.lr=1e-4"]), words
    assert not out.exists()  # a plan creates nothing


def test_plan_warns_when_a_checkpoint_cannot_be_written_within_the_grace_after_a_sigterm(tmp_path, capsys, monkeypatch):
    from transformers import BertConfig

    from conftest import ROOT

    BertConfig().save_pretrained(tmp_path / "bert")  # a 1.43 GiB checkpoint: ~2 s at the assumed 1 GB/s
    monkeypatch.chdir(ROOT)
    args = ["plan", "configs/train/clause_tos.yaml", "--accelerate-config", "configs/accelerate/deepspeed_zero3.yaml",
            "--nodes", "1", "--gpus-per-node", "2", f"model.name={tmp_path / 'bert'}", "train.micro_batch_size=4"]
    warning = "warning    the checkpoint alone takes longer than the grace"
    for grace, warned in (("1", True), ("5", False)):
        monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", grace)
        assert main(args) == 0
        lines = capsys.readouterr().out.splitlines()
        assert any(x.startswith(f"preemption after a SIGTERM the ranks have {grace} s ") for x in lines)
        assert any(x.startswith(warning) for x in lines) == warned


def test_plan_for_packed_sft_does_not_pretend_to_know_steps_per_epoch(capsys):
    from conftest import CONFIGS as C

    assert main(["plan", str(C / "train" / "sft_tiny.yaml"), "data.packing=true"]) == 0
    out = capsys.readouterr().out
    assert "steps      unknown: 512 synthetic rows are packed into 64-token blocks when the run starts" in out
    assert "parameters (tiny llama" in out
    # Rows past max_length dropped: the run counts them; plan printed 96 steps where the run
    # then kept no row at all.
    assert main(["plan", str(C / "train" / "sft_tiny.yaml"), "data.truncation=drop", "data.max_length=20"]) == 0
    out = capsys.readouterr().out
    assert ("steps      unknown: 512 synthetic rows, less those longer than 20 tokens (data.truncation=drop): "
            "counted when the run starts") in out


def test_plan_counts_the_rows_of_a_column_mapped_csv_as_training_reads_them(tmp_path, capsys):
    """Plan read an SFT CSV without data.prompt's mapping: "no instruction/output ..." on every
    row, which, once plan refused what training refuses, refused a good config."""
    from conftest import CONFIGS as C

    qa = tmp_path / "qa.csv"
    qa.write_text("question,answer\n" + "".join(f"capital {i},city {i}\n" for i in range(100)))
    assert main(["plan", str(C / "train" / "sft_tiny.yaml"), "data.synthetic.enabled=false", f"data.train_file={qa}",
                 f"data.validation_file={qa}", "data.prompt={question}", "data.response={answer}"]) == 0
    assert f"steps      100 rows ({qa}) / 32 = 3 steps per epoch" in capsys.readouterr().out


def test_plan_sizes_activations_and_logits_per_micro_batch(capsys):
    """Korthikanti et al. 2022: 34*s*b*h bytes per layer for 16-bit activations (sdpa keeps no
    score matrix), twice that in fp32; checkpointing keeps 2*s*b*h per layer plus one layer."""
    from conftest import CONFIGS as C

    assert main(["plan", str(C / "train" / "sft_tiny.yaml"), "train.micro_batch_size=4", "train.global_batch_size=8",
                 "train.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    s, b, h, layers, vocab = 64, 4, 64, 2, 400  # sft_tiny: max_length 64, hidden 64, 2 layers, vocabulary 400
    full = layers * s * b * h * 34 * 2
    ckpt = layers * 2 * s * b * h * 2 + s * b * h * 34 * 2
    assert (f"activations per micro-batch (4 x 64 tokens, 2 layers, hidden 64): {full / 2**20:.2f} MiB without "
            f"checkpointing, {ckpt / 2**20:.2f} MiB with it (train.gradient_checkpointing is on)") in out
    # The chunked loss (the default 256 response tokens at a time) never holds the micro-batch's
    # logits; the plan said it did.
    assert (f"logits     {8 * 256 * vocab / 2**10:.2f} KiB per chunk of 256 response tokens (train.loss_chunk_tokens; "
            f"float32 logits and log-probabilities, vocabulary 400); the model's own loss (0, or the fallback) holds "
            f"{8 * b * s * vocab / 2**10:.2f} KiB per micro-batch") in out
    assert main(["plan", str(C / "train" / "sft_tiny.yaml"), "train.micro_batch_size=4", "train.global_batch_size=8",
                 "train.loss_chunk_tokens=0"]) == 0
    assert (f"logits     {8 * b * s * vocab / 2**10:.2f} KiB per micro-batch (float32 logits and log-probabilities, "
            "vocabulary 400; train.loss_chunk_tokens is 0)") in capsys.readouterr().out


def test_plan_of_a_hub_model_it_cannot_fetch_says_so_in_its_line_without_retrying():
    """Without a network (here: a hub endpoint that refuses connections, offline mode off),
    transformers' own download of config.json retries five times over about 25 s, printing
    each retry; plan asks huggingface_hub's snapshot call, which fails at once, and prints the
    model's one line in its place."""
    import socket

    from conftest import launcher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed}",
           "HF_HUB_VERBOSITY": "warning"}  # (the retries are said at warning level)
    proc = launcher("plan", str(CONFIGS / "train" / "clause_tiny.yaml"), "model.name=launcher-tests/no-such-model",
                    env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("model      parameters unknown: model.name: cannot load 'launcher-tests/no-such-model' from the Hugging "
            "Face Hub (no network") in proc.stdout
    assert "Retry" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


def test_plan_counts_a_hub_model_from_its_cached_config_offline(tmp_path):
    """A hub model whose config.json is in the Hugging Face cache: plan counts it offline from
    that file alone (no weights in the cache)."""
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import launcher

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--launcher-tests--cached-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(repo / "snapshots" / commit)
    proc = launcher("plan", str(CONFIGS / "train" / "clause_tiny.yaml"), "model.name=launcher-tests/cached-bert",
                    env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("model "))
    assert line.endswith("parameters (config of launcher-tests/cached-bert)"), line
    config.num_labels = len(load_config(CONFIGS / "train" / "clause_tiny.yaml").data.resolved_label_names())
    assert int(line.split()[1].replace(",", "")) == sum(p.numel() for p in BertForSequenceClassification(config).parameters())


@pytest.mark.parametrize("name", ["cpu", "single_gpu"])
def test_a_one_process_config_keeps_the_gpu_a_scheduler_assigned(name, monkeypatch):
    """single_gpu.yaml said gpu_ids: '0', and accelerate then set CUDA_VISIBLE_DEVICES=0 over
    Slurm's own value (the GPU the job was given, say 3): on a node that does not fence GPUs
    per job, the run used another job's GPU. Read from accelerate's own environment builder,
    told that this CPU-only torch is a CUDA build (it sets the variable only for a GPU backend)."""
    import accelerate.utils.launch as accelerate_env
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / f"{name}.yaml"), "x.py"])
    _validate_launch_command(args)
    monkeypatch.setattr(accelerate_env, "get_torch_accelerator_backend", lambda check_available=False: ("cuda", None))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    _, env = accelerate_env.prepare_simple_launcher_cmd_env(args)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"


def test_plan_says_where_the_run_would_start_and_refuses_what_train_refuses(tmp_path, capsys):
    """`launcher plan` against an existing run said nothing of the resume, and exited 0 where
    train refuses: checkpoint.resume=never on an existing directory, a change that makes
    another run. It says where the run goes on, which changes it accepts, and refuses the same;
    and fp16 under an accelerate config that says use_cpu (train refused; plan printed)."""
    from conftest import FAST, check, launcher

    args = ["--output-dir", str(tmp_path), "--run-name", "r", *FAST, "train.max_steps=4", "checkpoint.every_steps=2",
            "eval.every_steps=100", "tracking.mlflow=false"]

    def plan(*extra: str) -> tuple[int, str, str]:
        code = main(["plan", str(TINY), *args, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = plan()
    assert code == 0 and f"resume     none: a new run in {tmp_path / 'r'}" in out.splitlines()
    check(launcher("train", str(TINY), *args))
    code, out, _ = plan("train.max_steps=8", "eval.every_steps=3")
    assert code == 0 and (f"resume     {tmp_path / 'r'} exists: goes on from step-000004 (step 4); config changes: "
                          "eval.every_steps, train.max_steps") in out.splitlines(), out
    code, out, _ = plan()
    assert code == 0 and (f"resume     {tmp_path / 'r'} exists: goes on from step-000004 (step 4), at or past "
                          "train.max_steps (4): nothing more trains") in out.splitlines(), out
    for extra, said in ((["checkpoint.resume=never"], f"error: run directory {tmp_path / 'r'} exists and checkpoint.resume=never"),
                        (["train.lr=0.1"], f"error: checkpoint.resume: {tmp_path / 'r'} would resume from step-000004 with "
                                           "train.lr: 0.001 -> 0.1")):
        code, out, err = plan(*extra)
        trained = launcher("train", str(TINY), *args, *extra)
        assert code == trained.returncode == 2 and not out, (code, out)
        assert err.splitlines()[0].startswith(said) and trained.stderr.splitlines()[-1] == err.splitlines()[0], err
    # A launch training in the run now: train refuses while it runs; the plan says so
    import os
    import subprocess
    import sys
    import time

    from conftest import OFFLINE_ENV

    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        busy = subprocess.Popen([sys.executable, "-m", "launcher", "train", str(TINY), *args, "train.max_steps=8"],
                                stdout=subprocess.DEVNULL, stderr=sink, env={**os.environ, **OFFLINE_ENV,
                                                                             "LAUNCHER_STALL": "0:6:120"})
    try:
        deadline = time.time() + 300
        while "LAUNCHER_STALL: rank 0 sleeps" not in errors.read_text():
            assert busy.poll() is None and time.time() < deadline, errors.read_text()[-2000:]
            time.sleep(0.1)
        code, out, _ = plan("train.max_steps=8")
        line = next(x for x in out.splitlines() if x.startswith("resume "))
        assert code == 0 and line.endswith(f"; in use now by another launch (host {os.uname().nodename}, pid {busy.pid}): "
                                           "train refuses while it runs"), line
    finally:
        busy.kill()
        busy.wait(timeout=60)
    cpu = CONFIGS / "accelerate" / "cpu.yaml"
    assert main(["plan", str(TINY), "--accelerate-config", str(cpu), "train.precision=fp16"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: train.precision: fp16 needs a CUDA GPU, and {cpu} says use_cpu: "
                                                    "true; use bf16 or no"]
