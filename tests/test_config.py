"""Config: parsing, overrides, validation, and the exit-2 one-line contract."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.config import RunConfig, field_docs, load_config
from launcher.errors import ConfigError

from conftest import CONFIGS, TINY


def shipped_configs():
    return sorted((CONFIGS / "train").rglob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in shipped_configs()}
    assert {"clause_tiny.yaml", "clause_tos.yaml", "clause_tos_multilabel.yaml", "clause_tos_minilm.yaml", "sft_tiny.yaml",
            "sft_lora_tiny.yaml", "llm_sft.yaml", "llm_sft_lora.yaml", "tos_llm_lora.yaml"} <= names


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_validates(path, tmp_path):
    # Real SFT recipes name the user's own data files, absent here: everything else is checked,
    # and the missing files are the only complaint.
    # A recipe for the shared UNFAIR-ToS clauses names them relative to the checkout; they
    # may be absent (a clone elsewhere): then, too, only the missing files are reported.
    data = yaml.safe_load(path.read_text()).get("data") or {}
    missing = [(k, v) for k, v in data.items() if k.endswith("_file") and v and not Path(v).is_file()]
    if missing:
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert e.value.problems == [f"data.{k}: {v}: file not found" for k, v in missing]
    given = []
    if "train_file" in data and data["train_file"] is None:  # an LLM recipe shipped without data says so in one line
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert len(e.value.problems) == 1 and e.value.problems[0].startswith("data.train_file: no instruction data given")
        stand_in = tmp_path / "rows.jsonl"
        stand_in.write_text('{"instruction": "q", "output": "a"}\n')
        given = [f"data.train_file={stand_in}", f"data.validation_file={stand_in}"]
    cfg = load_config(path, given, check_files=not missing)
    assert isinstance(cfg, RunConfig)
    assert cfg.run_name == path.stem
    # Every key in the file must have landed in the dataclasses (none silently dropped).
    raw = yaml.safe_load(path.read_text())

    def walk(tree, obj, prefix=""):
        for k, v in tree.items():
            assert hasattr(obj, k), f"{prefix}{k} not in config"
            if isinstance(v, dict):
                walk(v, getattr(obj, k), f"{prefix}{k}.")

    walk(raw, cfg)


def test_overrides_are_typed():
    cfg = load_config(TINY, ["train.lr=3e-5", "train.max_steps=7", "data.mode=multilabel", "tracking.wandb=true",
                             "data.label_names=[a, b, c]", "train.max_grad_norm=null"])
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.data.mode == "multilabel"
    assert cfg.tracking.wandb is True
    assert cfg.data.label_names == ["a", "b", "c"]
    assert cfg.train.max_grad_norm is None


def test_default_tracking_uri_is_sqlite_beside_runs(tmp_path):
    cfg = load_config(TINY, output_dir=str(tmp_path))
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def _run_cli(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, [l for l in captured.err.splitlines() if l.strip()]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1e-4", "train.lrr: unknown key; did you mean 'train.lr'?"),
        ("train.gradient_acumulation_steps=1", "train.gradient_acumulation_steps: unknown key; valid keys:"),
        ("trian.lr=1", "trian: unknown key; did you mean 'train'?"),
        ("train.lr=fast", "train.lr: expected float; got 'fast'"),
        ("train.epochs=2.5", "train.epochs: expected int; got 2.5"),
        ("data.mode=multi", "data.mode: expected one of binary, multiclass, multilabel; got 'multi'"),
        ("train.global_batch_size=30", "train.global_batch_size: 30 is not divisible by train.micro_batch_size (16) x world size (1) = 16"),
        ("eval.metric=macro-f1", "eval.metric: unknown metric 'macro-f1' for task classification; did you mean 'macro_f1'?"),
        ("train.lr=-1", "train.lr: must be > 0; got -1.0"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, override, expected):
    code, lines = _run_cli(capsys, ["train", str(TINY), "--output-dir", str(tmp_path / "out"), override])
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: " + expected), lines
    assert not (tmp_path / "out").exists()


def test_divisibility_uses_world_size(tmp_path, capsys, monkeypatch):
    # 32 examples per step split over 3 ranks x 16 per micro-batch cannot divide.
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, lines = _run_cli(capsys, ["train", str(TINY), "--output-dir", str(tmp_path)])
    assert code == 2
    assert lines == ["error: train.global_batch_size: 32 is not divisible by train.micro_batch_size (16) x world size (3) = 48; "
                     "no micro-batch size does on 3 ranks: use a number of ranks that divides it"]
    # 48 on 3 ranks: the micro-batch sizes that would divide it, largest first, at most the current one
    code, lines = _run_cli(capsys, ["train", str(TINY), "--output-dir", str(tmp_path), "train.global_batch_size=48",
                                    "train.micro_batch_size=5"])
    assert lines == ["error: train.global_batch_size: 48 is not divisible by train.micro_batch_size (5) x world size (3) = 15; "
                     "train.micro_batch_size 4 or 2 or 1 would divide it"]


def test_missing_data_file_is_named(tmp_path, capsys):
    code, lines = _run_cli(capsys, ["train", str(TINY), "--output-dir", str(tmp_path / "o"), "data.synthetic.enabled=false",
                                    f"data.train_file={tmp_path}/nope.jsonl", f"data.validation_file={tmp_path}/nope2.jsonl"])
    assert code == 2
    assert lines == [f"error: data.train_file: {tmp_path}/nope.jsonl: file not found",
                     f"error: data.validation_file: {tmp_path}/nope2.jsonl: file not found"]
    assert not (tmp_path / "o").exists()


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    code, lines = _run_cli(capsys, ["train", str(tmp_path / "none.yaml")])
    assert code == 2 and lines == [f"error: {tmp_path}/none.yaml: config file not found"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    code, lines = _run_cli(capsys, ["train", str(bad)])
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {bad}:") and "not valid YAML" in lines[0]


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.lr=0", "train.epochs=0", "data.nope=1"])
    assert len(e.value.problems) == 3


def test_local_model_path_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.name: /no/such/model: no such model directory$"):
        load_config(TINY, ["model.name=/no/such/model"])


def test_field_docs_cover_contract_keys():
    keys = {row[0] for row in field_docs()}
    contract = {"model.name", "data.train_file", "data.validation_file", "data.mode", "data.max_length",
                "train.epochs", "train.max_steps", "train.lr", "train.global_batch_size", "train.micro_batch_size",
                "train.seed", "checkpoint.every_steps", "checkpoint.resume", "tracking.uri"}
    assert contract <= keys


def test_run_directory_policy(tmp_path):
    """resolve_resume: a new directory starts fresh; an existing one resumes its newest complete
    checkpoint; one without a checkpoint is refused unless RUN/job.json names this very job."""
    from launcher import checkpoint as ck, owner

    run = tmp_path / "r"
    assert ck.resolve_resume(run, "auto", "7") == ck.Start()
    run.mkdir()
    owner.record_owner(run, "7", {"mlflow": "abc"})
    for job in (None, "8"):  # outside Slurm, or another job: never touched
        with pytest.raises(ConfigError, match="holds no complete checkpoint"):
            ck.resolve_resume(run, "auto", job)
    assert ck.resolve_resume(run, "auto", "7") == ck.Start(restart_of_job="7", tracker_ids={"mlflow": "abc"})
    # a lease left by a launch of this host that is gone (killed): step 0 in place; one whose
    # holder lives, or lives on another host, is no such evidence (and a live one is named)
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    for holder, start in (({"host": socket.gethostname(), "pid": int(gone)}, ck.Start(
            interrupted=True, killed=f"pid {int(gone)} on {socket.gethostname()}", tracker_ids={"mlflow": "abc"})),
            ({"host": socket.gethostname(), "pid": os.getpid()}, None), ({"host": "elsewhere", "pid": int(gone)}, None)):
        (run / owner.LEASE_FILE).write_text(json.dumps(holder))
        if start is None:
            with pytest.raises(ConfigError, match="holds no complete checkpoint"):
                ck.resolve_resume(run, "auto", None)
        else:
            assert ck.resolve_resume(run, "auto", None) == start
    (run / owner.LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone)}))
    (run / "best").mkdir()  # its best evaluation's weights, with no checkpoint: kept, so refused
    with pytest.raises(ConfigError, match="exists but holds no complete checkpoint"):
        ck.resolve_resume(run, "auto", None)
    (run / "best").rmdir()
    (run / owner.LEASE_FILE).unlink()
    # marked (a second Ctrl-C, or a stop before the first step, which says how): step 0 in place,
    # unless the run began from another run's checkpoint (from scratch, it would be another run)
    (run / ".interrupted").write_text("stopped before its first step (SIGTERM)")
    assert ck.resolve_resume(run, "auto", None) == ck.Start(interrupted=True, stopped="stopped before its first step "
                                                            "(SIGTERM)", tracker_ids={"mlflow": "abc"})
    owner.record_owner(run, "7", {"mlflow": "abc"}, started_from=tmp_path / "src" / "checkpoints" / "step-000004")
    with pytest.raises(ConfigError, match="exists but holds no complete checkpoint"):
        ck.resolve_resume(run, "auto", None)
    (run / ".interrupted").unlink()
    with pytest.raises(ConfigError, match="checkpoint.resume=never"):
        ck.resolve_resume(run, "never", "7")
    (run / "checkpoints" / ".tmp-step-000006").mkdir(parents=True)  # half-written: not a checkpoint
    (run / "checkpoints" / "step-000003").mkdir()
    (run / "checkpoints" / "step-000003" / ck.MARKER).touch()
    assert ck.resolve_resume(run, "auto", "8") == ck.Start(checkpoint=run / "checkpoints" / "step-000003",
                                                           partial=[run / "checkpoints" / ".tmp-step-000006"])


def test_a_bare_no_is_the_word_not_false(tmp_path):
    """YAML 1.1 reads `precision: no` (and the override train.precision=no) as false."""
    from launcher.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  precision: no\n")
    assert load_config(path, check_files=False).train.precision == "no"
    assert load_config(path, ["train.precision=bf16", "train.precision=no"], check_files=False).train.precision == "no"
    assert load_config(path, ["train.precision=bf16"], check_files=False).explicit >= {"train", "train.precision"}


def test_hub_failures_say_which_kind(tmp_path):
    """Offline here, so the hub's own exception types stand in for its answers, wrapped the
    way transformers wraps them (an OSError raised from them)."""
    from huggingface_hub import errors as hub

    from launcher.errors import ConfigError
    from launcher.models import from_pretrained, hub_problem

    def raised(inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise OSError("transformers says something") from e
        except OSError as outer:
            return outer

    import httpx

    def answer(cls, status):
        request = httpx.Request("GET", "https://huggingface.co/api/models/org/m")
        return cls(f"{status}", response=httpx.Response(status, request=request))

    assert "is gated or needs authorisation" in hub_problem("org/gated", raised(answer(hub.GatedRepoError, 401)))
    assert "was not found on the Hugging Face Hub" in hub_problem("org/typo", raised(answer(hub.RepositoryNotFoundError, 404)))
    assert hub_problem("org/m", raised(answer(hub.RevisionNotFoundError, 404))).startswith("model.revision: no such revision")
    (tmp_path / "empty").mkdir()
    assert "not a loadable Hugging Face model directory" in hub_problem(str(tmp_path / "empty"), OSError("no config.json"))
    # The real thing, offline: an id that is not cached is "no network, or not cached".
    from transformers import AutoConfig

    with pytest.raises(ConfigError) as e:
        from_pretrained(AutoConfig, "launcher-tests/no-such-model")
    assert e.value.problems[0].startswith("model.name: cannot load 'launcher-tests/no-such-model' from the Hugging Face Hub (no network")
    # Once the snapshot is on disk, a failure is the model's, said as it is: not "no network".
    from launcher import models
    from launcher.config import ModelConfig

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text('{"model_type": "a-model-type-of-2030"}')
    models.LOCAL[("org/new-model", None)] = str(snapshot)
    try:
        with pytest.raises(ConfigError) as e:
            from_pretrained(AutoConfig, "org/new-model", ModelConfig(name="org/new-model"))
    finally:
        del models.LOCAL[("org/new-model", None)]
    line = e.value.problems[0]
    assert line.startswith(f"model.name: 'org/new-model' is downloaded ({snapshot}) but does not load: ")
    assert "a-model-type-of-2030" in line and "no network" not in line


def test_credentials_in_a_tracking_uri_are_redacted_however_they_appear():
    from launcher.config import redact_text, redact_uri

    assert redact_uri("http://a:pw@h:5000/x?token=abc&x=1") == "http://a:***@h:5000/x?token=***&x=1"
    assert redact_uri("postgresql://u@h/db?password=zz&sslmode=require") == "postgresql://u@h/db?password=***&sslmode=require"
    assert redact_uri("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"  # unchanged, not sqlite:/runs
    # In a library's message: as written, percent-decoded, or on its own; short values only in the URI.
    uri = "https://h/?sig=a%2Fbcd&auth=1"
    said = "failed: https://h/?sig=a/bcd&auth=1 (a%2Fbcd, a/bcd) after 1 try"
    assert redact_text(said, uri) == "failed: https://h/?sig=***&auth=*** (***, ***) after 1 try"


def test_hub_weights_are_chosen_from_the_index_so_nothing_is_downloaded_twice(tmp_path):
    """A Mistral-style repository holds sharded safetensors with their index and a
    consolidated copy: the index names exactly the shards to fetch. Without an index the
    single model.safetensors comes first and the .bin pickles last, by their own index."""
    import json

    from launcher.hub import BIN_WEIGHTS, WEIGHTS, weight_patterns

    shards = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
              "c.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a.weight": "pytorch_model-1.bin"}}))
    assert weight_patterns(tmp_path) == [["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors"]]
    (tmp_path / "model.safetensors.index.json").unlink()
    assert weight_patterns(tmp_path) == [["model.safetensors"], WEIGHTS, ["pytorch_model.bin.index.json", "pytorch_model-1.bin"]]
    (tmp_path / "pytorch_model.bin.index.json").write_text("{not json")
    assert weight_patterns(tmp_path) == [["model.safetensors"], WEIGHTS, BIN_WEIGHTS]


def test_a_built_config_is_frozen_at_every_level():
    """Resolved once, before anything is built from it: no component can change a setting
    another one already read (a copy with the change is the way: RunConfig.replace, which keeps
    the record of the keys the user set)."""
    import dataclasses

    cfg = load_config(TINY, ["train.lr=0.002"])
    for section, name, value in ((cfg, "task", "causal_lm"), (cfg.train, "precision", "bf16"),
                                 (cfg.model.lora, "enabled", True), (cfg.tracking, "mlflow", False)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, value)
    assert cfg.run_name == TINY.stem and "train.lr" in cfg.explicit and "run_name" not in cfg.explicit
    copy = cfg.replace(train=dataclasses.replace(cfg.train, precision="bf16"))
    assert copy.train.precision == "bf16" and cfg.train.precision == "no" and copy.explicit == cfg.explicit


def test_a_resume_with_another_best_metric_or_quantization_is_another_run(tmp_path):
    """What picks the best checkpoint (its rotation, early stopping) and what the frozen base is
    are part of the run; the cadence of evaluations is not."""
    from launcher.config import dump_yaml
    from launcher.config_changes import _defines_run, changes

    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(load_config(TINY)))
    accepted, refused = changes(saved, load_config(TINY, ["eval.metric=loss", "eval.every_steps=7"]))
    assert list(refused) == ["eval.metric"] and list(accepted) == ["eval.every_steps"], (refused, accepted)
    assert _defines_run("model.quantization") and not _defines_run("model.attn_implementation")


def test_multiclass_takes_a_hub_dataset_of_its_own_not_the_unfair_tos_clauses():
    """The UNFAIR-ToS clauses are binary or multilabel; LexGLUE's other configs (LEDGAR, SCOTUS)
    are one class per row, and were refused with them."""
    from launcher.errors import ConfigError

    mc = ["data.mode=multiclass", "data.label_names=[a,b,c]", "data.synthetic.enabled=false"]
    assert load_config(TINY, [*mc, "data.hub_config=ledgar"]).data.hub_config == "ledgar"
    with pytest.raises(ConfigError, match="data.mode: multiclass needs data of its own"):
        load_config(TINY, mc)


def test_lora_modules_and_blocks_in_another_order_are_no_change(tmp_path):
    """peft matches target_modules, modules_to_save and layers_to_transform in any order: a
    resume with [v_proj, q_proj] after [q_proj, v_proj] was refused as weights that "do not load
    into this model", which checkpoint.resume_changed=allow could not override."""
    from launcher.config import dump_yaml
    from launcher.config_changes import changes

    lora = ["model.lora.enabled=true", "model.lora.target_modules=[query,value]", "model.lora.layers_to_transform=[0,1]"]
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(load_config(TINY, lora)))
    again = ["model.lora.enabled=true", "model.lora.target_modules=[value,query]", "model.lora.layers_to_transform=[1,0]"]
    assert changes(saved, load_config(TINY, again)) == ({}, {})
    _, refused = changes(saved, load_config(TINY, [*again, "model.lora.target_modules=[value,key]"]))
    assert list(refused) == ["model.lora.target_modules"]


def test_a_resume_compares_with_a_config_whose_data_is_gone_and_through_a_linked_checkpoints_folder(tmp_path):
    """The config a checkpoint was written under is read back for its fields alone: a data
    directory (save_to_disk) since deleted, or a file without a known suffix, made it fail
    validation, and every change (data, lr, model shape) was accepted unlisted. And RUN/checkpoints
    as a link to scratch is still the run's own: the resume was not compared at all."""
    from launcher.config import dump_yaml
    from launcher.config_changes import check_resume, changes
    from launcher.errors import ConfigError

    gone = tmp_path / "gone_dataset"
    (gone / "train").mkdir(parents=True)
    (gone / "train" / "state.json").write_text("{}")
    (gone / "validation").mkdir()
    (gone / "validation" / "state.json").write_text("{}")
    files = ["data.synthetic.enabled=false", f"data.train_file={gone / 'train'}",
             f"data.validation_file={gone / 'validation'}"]
    first = load_config(TINY, files)
    import shutil

    shutil.rmtree(gone)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(first))
    accepted, refused = changes(saved, load_config(TINY, ["train.lr=1e-4"]))
    assert {"data.train_file", "data.validation_file", "train.lr"} <= set(refused), (accepted, refused)

    run = tmp_path / "runs" / "r"
    scratch = tmp_path / "scratch" / "checkpoints"
    (scratch / "step-000004").mkdir(parents=True)
    run.mkdir(parents=True)
    (run / "checkpoints").symlink_to(scratch)
    cfg = load_config(TINY, output_dir=str(tmp_path / "runs"), run_name="r")
    (scratch / "step-000004" / "config.yaml").write_text(dump_yaml(cfg))
    assert check_resume(cfg, run / "checkpoints" / "step-000004") == {}
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.0001"):
        check_resume(load_config(TINY, ["train.lr=1e-4"], output_dir=str(tmp_path / "runs"), run_name="r"),
                     run / "checkpoints" / "step-000004")


def test_yaml_merge_keys_still_load_and_an_odd_key_is_one_line(tmp_path):
    """Refusing a key given twice must not refuse YAML's merge key (`<<: *defaults`, overridden
    by the mapping's own keys), nor turn a list used as a key into a traceback."""
    merged = tmp_path / "merged.yaml"
    merged.write_text("task: classification\ntrain:\n  <<: {lr: 1.0e-3, seed: 3}\n  seed: 5\n")
    cfg = load_config(merged, [], check_files=False)
    assert (cfg.train.lr, cfg.train.seed) == (1.0e-3, 5)
    # A mapping merged elsewhere is folded in place by PyYAML: checked after that, its merged
    # key and its own override read as one key twice.
    from launcher.config import _UniqueKeyLoader

    nested = ("base: &base {hidden: 64, layers: 2}\npresets:\n  small: &small\n    <<: *base\n    hidden: 128\n"
              "model:\n  <<: *small\n")
    assert yaml.load(nested, Loader=_UniqueKeyLoader)["model"] == {"hidden": 128, "layers": 2}
    twice = tmp_path / "twice.yaml"
    twice.write_text("task: classification\ntrain:\n  lr: 1.0e-3\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(twice, [], check_files=False)
    assert e.value.problems == [f"{twice}:4: not valid YAML ('train' appears twice in one mapping)"]
    odd = tmp_path / "odd.yaml"
    odd.write_text("task: classification\n? [1, 2]\n: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(odd, [], check_files=False)
    assert e.value.problems == [f"{odd}:2: not valid YAML (found unhashable key)"]


def test_a_home_path_in_an_override_leads_home(tmp_path, monkeypatch):
    """`data.train_file=~/d/train.jsonl` keeps its `~` in a shell (not an assignment there), and
    was "file not found" where model.name's `~` was read; config.yaml records where it leads."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / "d" / name).write_text('{"text": "a clause", "label": 1}\n' * 40)
    cfg = load_config(CONFIGS / "train" / "clause_tiny.yaml",
                      ["data.synthetic.enabled=false", "data.train_file=~/d/train.jsonl",
                       "data.validation_file=~/d/validation.jsonl", "data.cache_dir=~/cache"], output_dir="~/runs")
    assert cfg.data.train_file == str(tmp_path / "d" / "train.jsonl")
    assert cfg.data.validation_file == str(tmp_path / "d" / "validation.jsonl")
    assert cfg.data.cache_dir == str(tmp_path / "cache") and cfg.output_dir == str(tmp_path / "runs")
    (tmp_path / "hubdir").mkdir()  # a local folder standing in for a hub id: expanded too; an id stays an id
    assert load_config(CONFIGS / "train" / "clause_tos.yaml", ["data.hub_dataset=~/hubdir"]).data.hub_dataset == str(tmp_path / "hubdir")
    assert load_config(CONFIGS / "train" / "clause_tos.yaml").data.hub_dataset == "coastalcph/lex_glue"
    # a SQLite store under ~ (a directory named ~ in the current one, before)
    assert load_config(TINY, ["tracking.uri=sqlite:///~/m.db"]).tracking.uri == f"sqlite:///{tmp_path}/m.db"
    assert load_config(TINY, ["tracking.uri=http://host/~x"]).tracking.uri == "http://host/~x"


def test_an_override_of_a_text_field_is_the_text_typed(tmp_path):
    """Overrides were read as YAML whatever the field: run_name=2024_01 named the run 202401,
    tracking.experiment=yes logged to 'True', a system prompt was cut at '#', model.revision=0123
    was '83', and one generation prompt with a comma became two, all without a word."""
    cfg = load_config(CONFIGS / "train" / "sft_tiny.yaml", [
        "run_name=2024_01", "tracking.experiment=yes", "data.system_prompt=You are the #1 legal assistant",
        "model.revision=0123", "eval.generation_prompts=Is it amber, or zephyr?", "data.prompt={text}",
        "data.response=\"{label}\"", "data.label_names=fair,unfair", "train.precision=no", "tracking.wandb_mode=null"],
        check_files=False, check_values=False)
    assert cfg.run_name == "2024_01" and cfg.tracking.experiment == "yes"
    assert cfg.data.system_prompt == "You are the #1 legal assistant" and cfg.model.revision == "0123"
    assert cfg.eval.generation_prompts == ["Is it amber, or zephyr?"]
    assert cfg.data.prompt == "{text}" and cfg.data.response == "{label}"  # a quoted value: YAML's quotes go
    assert cfg.data.label_names == ["fair", "unfair"] and cfg.train.precision == "no" and cfg.tracking.wandb_mode is None
    # The review's cases: text that YAML reads as a comment, null or a boolean word, spaces.
    cfg = load_config(CONFIGS / "train" / "sft_tiny.yaml", ["data.system_prompt=#1 rule: be brief", "run_name=exp1 ",
                                                            "eval.generation_prompts=", "train.precision=off"],
                      check_files=False, check_values=False)
    assert cfg.data.system_prompt == "#1 rule: be brief" and cfg.run_name == "exp1"
    assert cfg.eval.generation_prompts == [] and cfg.train.precision == "no"  # (as `precision: off` in a file)
    assert load_config(TINY, ["data.system_prompt=~"], check_files=False).data.system_prompt is None
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["tracking.wandb_mode=off"])
    assert e.value.problems == ["tracking.wandb_mode: expected one of online, offline, disabled; got 'off'"]  # was got False
    (tmp_path / "c.yaml").write_text("eval:\n  generation_prompts: Is it amber, or zephyr?\n")
    assert load_config(tmp_path / "c.yaml", check_files=False).eval.generation_prompts == ["Is it amber, or zephyr?"]


@pytest.mark.parametrize("text, override, said", [
    ("model:\n  lora: yes\n", "model.lora.r=4", "model.lora: expected a mapping; got True"),
    ("model: tiny\n", "model.tiny.hidden_size=32", "model: expected a mapping; got 'tiny'"),
])
def test_an_override_inside_a_section_the_file_got_wrong_leaves_the_files_mistake_to_say(tmp_path, text, override, said):
    """The override replaced the file's `lora: yes` with a mapping holding r alone: the plan and
    the run went on without LoRA, while the file alone was refused."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml", [override], check_files=False)
    assert e.value.problems == [said]


@pytest.mark.parametrize("overrides, said", [
    (["output_dir="], "output_dir: empty; give a directory (default: runs), or . for this one"),
    (["model.name="], "model.name: empty; give a model directory, a GGUF file, a hub name or tiny"),
    (["train.max_steps=4", "train.halt_at_step=10"], "train.halt_at_step: 10 is past train.max_steps (4): the run would finish first"),
    (["train.collective_timeout_s=99999999999999999999"],
     "train.collective_timeout_s: at most 1000000000 (31 years); got 99999999999999999999"),
    (["train.collective_timeout_s=0"], "train.collective_timeout_s: must be > 0; got 0"),
])
def test_settings_that_would_quietly_do_something_else_are_refused(overrides, said):
    """An empty output_dir put the run, mlflow.db and the cache in the current directory; a halt
    past the end was ignored; a collective timeout past a timedelta's range was a traceback on
    every rank."""
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides, check_files=False)
    assert e.value.problems == [said]


def test_a_tiny_model_with_learned_positions_refuses_a_position_table_it_cannot_build():
    """data.max_length=100000000 on the tiny BERT asked torch for a 25.6 GB position table: a
    traceback from the allocator after the run folder was made. Rotary Llama has no table."""
    sft = CONFIGS / "train" / "sft_tiny.yaml"
    for path, more, arch in ((TINY, [], "bert"), (sft, ["model.tiny.arch=gpt2"], "gpt2")):
        with pytest.raises(ConfigError) as e:
            load_config(path, ["data.max_length=100000000", *more], check_files=False)
        assert e.value.problems == [f"data.max_length: at most 65536 for the tiny {arch} model, "
                                    "which learns a position table that long; got 100000000"]
        assert load_config(path, ["data.max_length=65536", *more], check_files=False).data.max_length == 65536
    assert load_config(sft, ["data.max_length=100000000"], check_files=False).data.max_length == 100000000
    with pytest.raises(ConfigError) as e:  # the gpt2 table holds the evaluation's answers too
        load_config(sft, ["model.tiny.arch=gpt2", "eval.max_new_tokens=100000000"], check_files=False)
    assert e.value.problems == ["eval.max_new_tokens: at most 65536 for the tiny gpt2 model, whose position table "
                                "holds the answers too; got 100000000"]


def test_lora_targets_and_booleans_take_the_forms_other_fields_take():
    """target_modules=q_proj or q_proj,v_proj was refused (other lists of names take a,b);
    gradient_checkpointing=1 was refused while "1" was taken."""
    lora = ["model.lora.enabled=true"]
    assert load_config(TINY, [*lora, "model.lora.target_modules=query"]).model.lora.target_modules == ["query"]
    assert load_config(TINY, [*lora, "model.lora.target_modules=query, value"]).model.lora.target_modules == ["query", "value"]
    assert load_config(TINY, [*lora, "model.lora.target_modules=all-linear"]).model.lora.target_modules == "all-linear"
    assert load_config(TINY, ["train.gradient_checkpointing=1"]).train.gradient_checkpointing is True
    assert load_config(TINY, ["train.gradient_checkpointing=0"]).train.gradient_checkpointing is False
    with pytest.raises(ConfigError):
        load_config(TINY, ["train.gradient_checkpointing=2"])


def test_a_whole_number_in_scientific_notation_and_on_off_read_as_yaml_reads_them(tmp_path):
    """train.max_steps=5e4 was refused (expected int; got '5e4') where 5.0e+4 read as 50000: YAML
    1.1 reads the first as text, the second as a float. A quoted "on"/"off" was refused where
    "yes"/"no" were taken. A fraction or a number past an int is still refused."""
    for text in ("5e4", "5E4", "5.0e+4", "50000"):
        assert load_config(TINY, [f"train.max_steps={text}"]).train.max_steps == 50_000, text
    written = tmp_path / "c.yaml"
    written.write_text(TINY.read_text().replace("epochs: 3", "max_steps: '5e4'"))
    assert load_config(written).train.max_steps == 50_000
    for text, value in (("on", True), ("OFF", False), ("On", True)):
        assert load_config(TINY, [f"train.gradient_checkpointing={text}"]).train.gradient_checkpointing is value
    for bad in ("1.5e0", "1e30", "5e", "nan"):
        with pytest.raises(ConfigError, match=f"train.max_steps: expected int; got '{re.escape(bad)}'"):
            load_config(TINY, [f"train.max_steps={bad}"])


def test_a_warmup_longer_than_the_run_is_said_with_the_peak_it_reaches(tmp_path):
    """A smoke test of a long recipe (max_steps=4, warmup_steps: 10) peaked at 3e-4 of a 1e-3
    learning rate without a word: now one line says so (a note, not a refusal)."""
    import json

    from conftest import FAST, check, launcher

    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), *FAST, "train.max_steps=4", "train.warmup_steps=10",
                          "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=4"))
    assert "note: train.warmup_steps 10 is more than the run's 4 steps: the learning rate peaks at 30% of train.lr" in proc.stdout
    lrs = [json.loads(x).get("train/lr") for x in (tmp_path / "clause_tiny" / "metrics.jsonl").read_text().splitlines()]
    assert max(x for x in lrs if x is not None) == pytest.approx(0.3 * 1e-3)


def test_an_older_config_yaml_with_relative_data_paths_compares_from_here_and_shows_what_it_recorded(tmp_path, monkeypatch):
    """A run directory from before paths were recorded absolute: its config.yaml holds
    data/train.jsonl. Named so again from the same directory: no change (it resumed before);
    the same files named absolutely from elsewhere: the change shows the path as recorded, not
    one resolved from here, which the run never read."""
    from launcher.config import to_dict
    from launcher.config_changes import changes

    for place, label in (("a", 1), ("b", 0)):
        (tmp_path / place / "data").mkdir(parents=True)
        for name in ("train.jsonl", "validation.jsonl"):
            (tmp_path / place / "data" / name).write_text(f'{{"text": "a clause", "label": {label}}}\n' * 40)
    relative = ["data.synthetic.enabled=false", "data.train_file=data/train.jsonl", "data.validation_file=data/validation.jsonl"]
    monkeypatch.chdir(tmp_path / "a")
    old = to_dict(load_config(TINY, relative, absolute_data=False))
    assert old["data"]["train_file"] == "data/train.jsonl"  # as an older launcher wrote config.yaml
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(old))
    assert changes(saved, load_config(TINY, relative)) == ({}, {})
    monkeypatch.chdir(tmp_path / "b")
    absolute = ["data.synthetic.enabled=false", f"data.train_file={tmp_path / 'a' / 'data' / 'train.jsonl'}",
                f"data.validation_file={tmp_path / 'a' / 'data' / 'validation.jsonl'}"]
    _, refused = changes(saved, load_config(TINY, absolute))
    assert refused["data.train_file"] == ("data/train.jsonl", str(tmp_path / "a" / "data" / "train.jsonl"))


def test_a_resume_finds_the_recorded_data_however_it_is_named_now_and_takes_a_copy_as_the_same(tmp_path, monkeypatch, capsys):
    """Paths recorded absolute made three resumes refuse their own data: an older run's
    ~/data/train.jsonl (never expanded when compared), the same file through a symbolic link,
    and a byte-equal copy in another directory (a job that stages its data in its own scratch
    directory and resumes from the next one). A copy is a change the resume lists; other rows
    are refused as before."""
    from launcher.config import to_dict
    from launcher.config_changes import changes

    home, scratch, other = tmp_path / "home", tmp_path / "job2", tmp_path / "other"
    for place, label in ((home, 1), (scratch, 1), (other, 0)):
        (place / "data").mkdir(parents=True)
        for name in ("train.jsonl", "validation.jsonl"):
            (place / "data" / name).write_text(f'{{"text": "a clause", "label": {label}}}\n' * 40)
    (tmp_path / "link").symlink_to(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)

    def files(root: str) -> list[str]:
        return ["data.synthetic.enabled=false", f"data.train_file={root}/data/train.jsonl",
                f"data.validation_file={root}/data/validation.jsonl"]

    saved = tmp_path / "config.yaml"
    recorded = yaml.safe_dump(to_dict(load_config(TINY, files(str(home)))))
    saved.write_text(recorded.replace(str(home), "~"))  # as an older launcher recorded a ~ it did not expand
    assert changes(saved, load_config(TINY, files(str(home)))) == ({}, {})
    assert changes(saved, load_config(TINY, files(str(tmp_path / "link")))) == ({}, {})
    accepted, refused = changes(saved, load_config(TINY, files(str(scratch))))
    assert refused == {} and accepted["data.train_file"] == (str(home / "data" / "train.jsonl"), str(scratch / "data" / "train.jsonl"))
    assert f"launcher: {scratch / 'data' / 'train.jsonl'} is not the recorded {home / 'data' / 'train.jsonl'}; " \
           "comparing their 0 MiB byte for byte" in capsys.readouterr().out
    _, refused = changes(saved, load_config(TINY, files(str(other))))
    assert refused["data.train_file"] == (str(home / "data" / "train.jsonl"), str(other / "data" / "train.jsonl"))
    # a local folder as data.hub_dataset, which an older launcher kept as ~/data
    folder = ["data.synthetic.enabled=false", f"data.hub_dataset={home / 'data'}"]
    saved.write_text(yaml.safe_dump(to_dict(load_config(TINY, folder))).replace(str(home), "~"))
    assert "hub_dataset: ~/data" in saved.read_text()
    assert changes(saved, load_config(TINY, folder)) == ({}, {})
    assert changes(saved, load_config(TINY, ["data.synthetic.enabled=false", "data.hub_dataset=~/data"])) == ({}, {})
    accepted, refused = changes(saved, load_config(TINY, ["data.synthetic.enabled=false", f"data.hub_dataset={scratch / 'data'}"]))
    assert refused == {} and accepted == {"data.hub_dataset": ("~/data", str(scratch / "data"))}


def test_a_resume_refuses_only_the_changes_a_checkpoints_weights_cannot_load_under():
    """A tiny BERT's or GPT-2's learned position table is sized from data.max_length (and a
    causal one's eval.max_new_tokens): refused even when allowed. A tiny Llama's rotary
    positions have no table, so the same changes load (they were refused for it too)."""
    from launcher.config_changes import _shape_changes

    diff = {"data.max_length": (64, 96), "eval.max_new_tokens": (16, 32), "model.tiny.hidden_size": (32, 64),
            "train.lr": (1e-3, 1e-4)}
    sft = CONFIGS / "train" / "sft_tiny.yaml"
    assert set(_shape_changes(load_config(TINY, []), diff)) == {"data.max_length", "model.tiny.hidden_size"}
    assert set(_shape_changes(load_config(sft, ["model.tiny.arch=gpt2"]), diff)) == {
        "data.max_length", "eval.max_new_tokens", "model.tiny.hidden_size"}
    assert set(_shape_changes(load_config(sft, ["model.tiny.arch=llama"]), diff)) == {"model.tiny.hidden_size"}



def test_train_help_says_how_a_run_resumes_with_keys_that_exist(capsys, tmp_path):
    """`launcher train --help` said nothing of resuming, the first thing a cluster user needs
    (the same command again). Its lines name config keys; each one given is accepted."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the same command again goes on from the run directory's newest checkpoint" in text
    given = set(re.findall(r"\b([a-z_]+\.[a-z_]+)=([a-z]+)", text))
    assert {k for k, _ in given} >= {"checkpoint.resume", "checkpoint.resume_changed"}, given
    for key, value in given:
        cfg = load_config(TINY, [f"{key}={value}"], output_dir=str(tmp_path))
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
