"""What users get wrong, as a table: every malformed config, data file and launch combination
exits 2 with one line naming the field or file[:line], prints no traceback, and leaves no
run directory and no MLflow store behind. Each case runs `python -m launcher` in a fresh
process, as a user would.

Files are written per case by `make(tmp) -> overrides`; `expect` is the start of the one
`error:` line ({tmp} is the case's directory).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, FAST, OFFLINE_ENV, ROOT, TINY, all_runs, check, launcher, mlflow_client

SFT = CONFIGS / "train" / "sft_tiny.yaml"


def _flash_runs() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


_FLASH_RUNS = _flash_runs()  # where flash attention can run, its refusal cannot be tested
GOOD = '{"text": "We may terminate your account at any time.", "label": 1}\n' * 40


def _files(train: str | bytes, name: str = "train.jsonl", validation: str = GOOD):
    """Overrides for a file-data run whose training file holds `train`."""
    def make(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(train if isinstance(train, bytes) else train.encode())
        (tmp / "validation.jsonl").write_text(validation)
        return ["data.synthetic.enabled=false", f"data.train_file={path}", f"data.validation_file={tmp / 'validation.jsonl'}"]
    return make


def _plain(*overrides: str):
    return lambda tmp: [o.format(tmp=tmp) for o in overrides]


def _write(name: str, text: str, *overrides: str):
    """Writes `name` (and a good v.jsonl beside it), then the overrides."""
    def make(tmp: Path) -> list[str]:
        (tmp / "v.jsonl").write_text(GOOD)
        (tmp / name).write_text(text.format(tmp=tmp) if "{tmp}" in text else text)
        return [o.format(tmp=tmp) for o in overrides]
    return make


def _lora_part(part: str, *args: str, parent_meta: bool = True):
    """A LoRA export's layout (model/launcher.json, model/adapter, model/base), or an adapter
    copied out of it (no launcher.json above it: its base_model_name_or_path is null)."""
    def make(tmp: Path) -> list[str]:
        model = tmp / "model"
        (model / "adapter").mkdir(parents=True)
        (model / "base").mkdir()
        if parent_meta:
            (model / "launcher.json").write_text('{"task": "causal_lm"}')
        (model / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": null, "peft_type": "LORA"}')
        (model / "base" / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "x.txt").write_text("a clause\n")
        return [str(model / part), *(a.format(tmp=tmp) for a in args)]
    return make


def _ds_yaml(ds: dict | str, *overrides: str):
    def make(tmp: Path) -> list[str]:
        (tmp / "ds.json").write_text(ds if isinstance(ds, str) else json.dumps(ds))
        (tmp / "accel.yaml").write_text(f"distributed_type: DEEPSPEED\nnum_processes: 2\n"
                                        f"deepspeed_config:\n  deepspeed_config_file: {tmp / 'ds.json'}\n")
        return ["--accelerate-config", str(tmp / "accel.yaml"), *overrides]
    return make


def _cache_dir(mode: int, uid: int | None = None):
    def make(tmp: Path) -> list[str]:
        (tmp / "cache").mkdir()
        os.chmod(tmp / "cache", mode)
        if uid is not None:
            os.chown(tmp / "cache", uid, -1)  # needs root, as the Slurm tests do
        return [f"data.cache_dir={tmp / 'cache'}"]
    return make


CLAUSE_ROWS = "".join(json.dumps({"text": f"We may end it at any time ({i}).", "category": "Other" if i % 2 else "Arbitration"}) + "\n"
                      for i in range(40))
LLM = CONFIGS / "train" / "llm_sft_lora.yaml"


def _sft_files(train: str, *overrides: str):
    """Overrides for an SFT run on files: `train` is the training file and the validation file."""
    def make(tmp: Path) -> list[str]:
        (tmp / "train.jsonl").write_text(train)
        (tmp / "validation.jsonl").write_text(train)
        return ["data.synthetic.enabled=false", f"data.train_file={tmp / 'train.jsonl'}",
                f"data.validation_file={tmp / 'validation.jsonl'}", *overrides]
    return make


def _run_dir_not_model(tmp: Path) -> list[str]:
    (tmp / "run" / "model").mkdir(parents=True)
    (tmp / "run" / "model" / "launcher.json").write_text('{"task": "classification"}')
    (tmp / "v.jsonl").write_text(GOOD)
    return [str(tmp / "run"), "--data", str(tmp / "v.jsonl")]


def _checkpoints(given: str, *args: str, sealed: tuple = (4, 8), skeleton: bool = True):
    """A run directory that holds checkpoints and no exported model (a run still going, or
    killed); `given` is the folder given as MODEL_DIR, relative to the work folder."""
    def make(tmp: Path) -> list[str]:
        for step in (4, 8, 12):
            ckpt = tmp / "run" / "checkpoints" / f"step-{step:06d}"
            (ckpt / ("skeleton" if skeleton else "pytorch_model")).mkdir(parents=True)
            if step in sealed:
                (ckpt / "COMPLETE").write_text("sealed\n")
        (tmp / "x.txt").write_text("a clause\n")
        return [str(tmp / given), *[a.format(tmp=tmp) for a in args]]
    return make


ZERO2 = json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())

# (name, command, config, make, expected start of the error line)
CASES = [
    # ---- config keys, types, values
    ("unknown key", "train", TINY, _plain("train.lrr=1e-4"), "train.lrr: unknown key; did you mean 'train.lr'?"),
    ("unknown section", "train", TINY, _plain("trian.lr=1"), "trian: unknown key; did you mean 'train'?"),
    ("float expected", "train", TINY, _plain("train.lr=fast"), "train.lr: expected float; got 'fast'"),
    ("int expected", "train", TINY, _plain("train.epochs=2.5"), "train.epochs: expected int; got 2.5"),
    ("enum value", "train", TINY, _plain("data.mode=multi"), "data.mode: expected one of binary, multiclass, multilabel"),
    ("negative lr", "train", TINY, _plain("train.lr=-1"), "train.lr: must be > 0"),
    ("warmup ratio 1.5", "train", TINY, _plain("train.warmup_ratio=1.5"), "train.warmup_ratio: must be in [0, 1)"),
    ("batch not divisible", "train", TINY, _plain("train.global_batch_size=30"), "train.global_batch_size: 30 is not divisible"),
    ("unknown metric", "train", TINY, _plain("eval.metric=macro-f1"), "eval.metric: unknown metric 'macro-f1'"),
    ("accuracy in multilabel", "train", TINY, _plain("data.mode=multilabel", "eval.metric=accuracy"),
     "eval.metric: accuracy is reported for one class per row (data.mode binary or multiclass)"),
    ("lora r 0", "train", TINY, _plain("model.lora.enabled=true", "model.lora.r=0"), "model.lora.r: must be > 0"),
    ("lora dropout 1.5", "train", TINY, _plain("model.lora.enabled=true", "model.lora.dropout=1.5"), "model.lora.dropout: must be in [0, 1)"),
    ("lora targets not a list", "train", TINY, _plain("model.lora.enabled=true", "model.lora.target_modules=5"),
     "model.lora.target_modules: a list of module names"),
    ("heads do not divide hidden", "train", TINY, _plain("model.tiny.num_heads=3"), "model.tiny.hidden_size: must be divisible"),
    ("llama for classification", "train", TINY, _plain("model.tiny.arch=llama"), "model.tiny.arch: llama does not fit task classification"),
    ("packing for classification", "train", TINY, _plain("data.packing=true"), "data.packing: only for task causal_lm"),
    ("mean pooling for a causal LM", "train", SFT, _plain("model.pooling=mean"), "model.pooling: mean is for task classification"),
    ("threshold for causal LM", "train", SFT, _plain("eval.tune_threshold=true"), "eval.tune_threshold: only for task classification"),
    ("template without instruction", "train", SFT, lambda tmp: ["data.prompt_template_no_input=Answer {input}"],
     "data.prompt_template_no_input: must contain {{instruction}}"),
    ("a JSON example's braces in a template", "train", SFT,
     lambda tmp: ['data.prompt_template_no_input=Reply like {"label": "x"}: {instruction}\n'],
     "data.prompt_template_no_input: {{\"label\"}} is not a placeholder here (it takes {{instruction}}, {{input}}); "
     "write a literal brace as {{{{ or }}}}"),
    ("an unclosed brace in a turn template", "train", SFT, lambda tmp: ["data.chat_turn_template={role}: {content"],
     "data.chat_turn_template: not a valid template (expected '}}' before end of string); write a literal brace as {{{{ or }}}}"),
    ("binary with three names", "train", TINY, _plain("data.label_names=[a,b,c]"), "data.label_names: binary mode needs 2 names"),
    ("duplicate label names", "train", TINY, _plain("data.label_names=[a,a]"), "data.label_names: names must be unique"),
    ("a text column for a causal LM", "train", SFT, _plain("data.text_column=sentence"),
     "data.text_column / data.label_column: for task classification (a causal LM maps its columns with data.prompt"),
    ("one column as text and label", "train", TINY, _write("t.jsonl", GOOD, "data.synthetic.enabled=false",
     "data.train_file={tmp}/t.jsonl", "data.validation_file={tmp}/v.jsonl", "data.text_column=x", "data.label_column=x"),
     "data.label_column: 'x' is data.text_column too"),
    ("a text column of synthetic clauses", "train", TINY, _plain("data.text_column=sentence"),
     "data.text_column / data.label_column: name columns of your own data; synthetic clauses (data.synthetic.enabled) "
     "have text and labels"),
    ("multiclass without its class names", "train", TINY, _write("t.jsonl", GOOD, "data.mode=multiclass",
     "data.synthetic.enabled=false", "data.train_file={tmp}/t.jsonl", "data.validation_file={tmp}/v.jsonl"),
     "data.label_names: data.mode=multiclass needs the class names, 2 or more"),
    ("multiclass on the synthetic clauses", "train", TINY, _plain("data.mode=multiclass", "data.label_names=[a,b,c]"),
     "data.mode: multiclass needs data of its own (data.train_file, or data.hub_dataset=ID)"),
    ("a tuned cut for multiclass", "train", TINY, _write("t.jsonl", GOOD, "data.mode=multiclass", "data.label_names=[a,b]",
     "eval.tune_threshold=true", "data.synthetic.enabled=false", "data.train_file={tmp}/t.jsonl",
     "data.validation_file={tmp}/v.jsonl"),
     "eval.tune_threshold: binary and multilabel only (multiclass takes the likeliest class)"),

    ("label names alike but for case", "train", TINY, _plain("data.label_names=[Tech,tech]"),
     "data.label_names: names must be unique (case and spaces aside: rows match them so)"),
    ("a category named None", "train", TINY, _plain("data.mode=multilabel", "data.label_names=[a,None]"),
     "data.label_names: 'none' is the name of multilabel's column"),
    ("a category named none", "train", TINY, _plain("data.mode=multilabel", "data.label_names=[a,none]"),
     "data.label_names: 'none' is the name of multilabel's column for clauses with no category"),
    ("run name with a slash", "train", TINY, _plain("--run-name", "a/b"), "run_name: must be a plain directory name"),
    ("too few synthetic rows", "train", TINY, _plain("data.synthetic.n_train=10"),
     "data.synthetic.n_train: 10 rows is fewer than train.global_batch_size (32)"),
    ("synthetic and files", "train", TINY, _plain("data.train_file={tmp}/x.jsonl", "data.validation_file={tmp}/x.jsonl"),
     "data.synthetic.enabled: set data.train_file/validation_file to null"),
    ("train without validation", "train", TINY, _write("x.jsonl", GOOD, "data.synthetic.enabled=false", "data.train_file={tmp}/x.jsonl"),
     "data.validation_file: required when data.train_file is set"),
    ("missing data file", "train", TINY, _write("v.jsonl", GOOD, "data.synthetic.enabled=false", "data.train_file={tmp}/none.jsonl",
                                                 "data.validation_file={tmp}/v.jsonl"), "data.train_file: {tmp}/none.jsonl: file not found"),
    # (a shipped recipe's ../shared/... run from another directory: the line said only the path it made)
    ("data file named relative to where you start", "train", TINY,
     _write("v.jsonl", GOOD, "data.synthetic.enabled=false", "data.train_file=none/train.jsonl", "data.validation_file={tmp}/v.jsonl"),
     f"data.train_file: {ROOT}/none/train.jsonl: file not found (none/train.jsonl read from the directory you start in, {ROOT})"),
    ("unsupported format", "train", TINY, _write("a.txt", "x\n", "data.synthetic.enabled=false", "data.train_file={tmp}/a.txt",
                                                  "data.validation_file={tmp}/v.jsonl"), "data.train_file: {tmp}/a.txt: unsupported format"),
    ("directory instead of file", "train", TINY, _write("v.jsonl", GOOD, "data.synthetic.enabled=false", "data.train_file={tmp}",
                                                         "data.validation_file={tmp}/v.jsonl"), "data.train_file: {tmp}: a directory, but not one"),
    ("missing local model", "train", TINY, _plain("model.name={tmp}/no-model"), "model.name: {tmp}/no-model"),
    ("missing resume dir", "train", TINY, _plain("checkpoint.resume={tmp}/ckpt"), "checkpoint.resume: {tmp}/ckpt: no such checkpoint"),
    ("output dir is a file", "train", TINY, _write("afile", "", "--output-dir", "{tmp}/afile"), "output_dir: {tmp}/afile is a file"),
    # (the default store's URI: MLflow read q?x/mlflow.db as the file q, outside the directory)
    ("output dir with a ? and the default store", "train", TINY, _plain("--output-dir", "{tmp}/q?x"),
     "output_dir: {tmp}/q?x holds '?', which the default MLflow store's sqlite:/// URI cannot carry"),
    ("output dir with a % and the default store", "train", TINY, _plain("--output-dir", "{tmp}/a%20b"),
     "output_dir: {tmp}/a%20b holds '%', which the default MLflow store's sqlite:/// URI cannot carry"),
    ("config file missing", "train", None, _plain("{tmp}/nope.yaml"), "{tmp}/nope.yaml"),
    ("config not YAML", "train", None, _write("bad.yaml", "train: [1, 2\n", "{tmp}/bad.yaml"), "{tmp}/bad.yaml"),
    # ---- data files
    ("not UTF-8", "train", TINY, _files(b'{"text": "caf\xe9", "label": 0}\n' + GOOD.encode()), "{tmp}/train.jsonl:1: not valid UTF-8"),
    ("broken JSON line", "train", TINY, _files(GOOD + '{"text": "x", "label": \n'), "{tmp}/train.jsonl:41:"),
    ("truncated last line", "train", TINY, _files(GOOD + '{"text": "We may chan'), "{tmp}/train.jsonl:41:"),
    ("a 10 MB line", "train", TINY, _files(GOOD + "x" * 10_000_000 + "\n"), "{tmp}/train.jsonl:41:"),
    ("not Parquet", "train", TINY, _files("not parquet\n", "train.parquet"), "{tmp}/train.parquet: not a readable Parquet file"),
    ("CSV row without text", "train", TINY, _files("text,label\n,0\n" + "We may end it at any time.,1\n" * 40, "train.csv"),
     "{tmp}/train.csv:2: missing or empty 'text'"),
    ("empty training file", "train", TINY, _files(""), "{tmp}/train.jsonl"),
    ("label outside the set", "train", TINY, _files('{"text": "x y z", "label": "maybe"}\n' + GOOD), "{tmp}/train.jsonl:1:"),
    ("category id 9", "train", TINY, lambda tmp: ["data.mode=multilabel", *_files('{"text": "x y z", "labels": [9]}\n' + GOOD.replace('"label": 1', '"labels": [1]'),
                                                           validation=GOOD.replace('"label": 1', '"labels": [1]'))(tmp)],
     "{tmp}/train.jsonl:1: category id 9 out of range"),
    ("text not a string", "train", TINY, _files('{"text": 42, "label": 0}\n' + GOOD), "{tmp}/train.jsonl:1:"),
    ("no text field", "train", TINY, _files('{"body": "x", "label": 0}\n' + GOOD), "{tmp}/train.jsonl:1:"),
    ("fewer rows than a batch", "train", TINY, _files(GOOD[: len(GOOD) // 40 * 5]),
     "{tmp}/train.jsonl: 5 rows is fewer than train.global_batch_size (32)"),
    # ---- instruction data and LLM recipes
    ("LLM recipe without data", "train", LLM, _plain(), "data.train_file: no instruction data given; pass data.train_file="),
    ("placeholder not a column name", "train", SFT, lambda tmp: ["data.prompt=Classify {}", "data.response={category}"],
     "data.prompt: placeholder {{}} is not a column name"),
    ("prompt without response", "train", SFT, lambda tmp: ["data.prompt=Classify {text}"], "data.response: required with data.prompt"),
    ("prompt names no column", "train", SFT, _sft_files(CLAUSE_ROWS, "data.prompt=Classify {tex}", "data.response={category}"),
     "data.prompt: {{tex}} is not a column of {tmp}/train.jsonl (its columns: text, category)"),
    ("instruction data of no known shape", "train", SFT, _sft_files(CLAUSE_ROWS),
     "{tmp}/train.jsonl: no instruction/output, messages, prompt/completion or conversations (ShareGPT) columns"),
    ("mapped value missing in a row", "train", SFT,
     _sft_files('{"text": "no category here"}\n' + CLAUSE_ROWS, "data.prompt=Classify {text}", "data.response={category}"),
     "{tmp}/train.jsonl:1: no 'category' value for data.response"),
    ("ShareGPT turn without a value", "train", SFT, _sft_files('{"conversations": [{"from": "human"}]}\n' + CLAUSE_ROWS.replace(
        '"text"', '"instruction"').replace('"category"', '"output"')), "{tmp}/train.jsonl:1: conversations[0] needs from"),
    ("choice metric on free-form answers", "train", SFT,
     _sft_files("".join(json.dumps({"instruction": f"q{i}", "output": f"answer number {i}"}) + "\n" for i in range(40)),
                "eval.metric=choice_macro_f1", "data.prompt=null", "train.max_steps=1"),
     "eval.metric: choice_macro_f1 needs a closed set of answers"),
    ("every row longer than max_length", "train", SFT,
     _sft_files(CLAUSE_ROWS.replace('"text"', '"instruction"').replace('"category"', '"output"'), "data.truncation=drop",
                "data.max_length=4"),
     "{tmp}/train.jsonl: no usable rows: all 40 were dropped (data.max_length 4, data.truncation drop)"),
    ("packed blocks fewer than a batch", "train", SFT,
     _sft_files(CLAUSE_ROWS.replace('"text"', '"instruction"').replace('"category"', '"output"'), "data.packing=true"),
     "{tmp}/train.jsonl: 40 rows pack into"),
    ("flash attention in fp32", "train", SFT, _plain("model.attn_implementation=flash_attention_2"),
     "model.attn_implementation: flash_attention_2 runs in bf16 or fp16 only, and train.precision is no (fp32)"),
    ("plan: flash attention in fp32", "plan", SFT, _plain("model.attn_implementation=flash_attention_2"),
     "model.attn_implementation: flash_attention_2 runs in bf16 or fp16 only, and train.precision is no (fp32)"),
    ("plan: a quantized base on two ranks", "plan", SFT,
     _plain("--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), "model.quantization=nf4",
            "model.lora.enabled=true", "model.name={tmp}"),
     "model.quantization: nf4 runs on one process for now"),
    *([("flash attention without a GPU", "train", SFT, _plain("model.attn_implementation=flash_attention_2", "train.precision=bf16"),
        "model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package")] if not _FLASH_RUNS else []),
    ("GGUF file missing", "train", SFT, _plain("model.name={tmp}/model.gguf"), "model.name: {tmp}/model.gguf: no such GGUF file"),
    ("not a GGUF file", "train", SFT, _write("model.gguf", "not gguf at all", "model.name={tmp}/model.gguf"),
     "model.name: {tmp}/model.gguf: not a GGUF file transformers can read"),
    # ---- launch combinations
    ("launch flag without config", "train", TINY, _plain("--num-processes", "2"), "--num-processes: only with --accelerate-config"),
    ("a one-process config on two ranks", "train", TINY,
     _plain("--accelerate-config", str(CONFIGS / "accelerate" / "single_gpu.yaml"), "--num-processes", "2"),
     f"{CONFIGS / 'accelerate' / 'single_gpu.yaml'}: distributed_type: NO with 2 process(es) on 1 machine(s): accelerate launch "
     "starts ONE process on each machine"),
    ("plan: a one-process config on two nodes", "plan", TINY,
     _plain("--accelerate-config", str(CONFIGS / "accelerate" / "single_gpu.yaml"), "--nodes", "2", "--gpus-per-node", "1"),
     f"{CONFIGS / 'accelerate' / 'single_gpu.yaml'}: distributed_type: NO with 2 process(es) on 2 machine(s)"),
    ("processes not a multiple of machines", "plan", TINY, _write("a.yaml", "distributed_type: MULTI_GPU\nnum_processes: 3\n"
                                                                     "num_machines: 2\n", "--accelerate-config", "{tmp}/a.yaml"),
     "{tmp}/a.yaml: num_processes 3 is not a multiple of num_machines 2: accelerate launch would start 1 process(es) on each "
     "machine, 2 in all"),
    ("train: processes not a multiple of machines", "train", TINY,
     _plain("--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), "--num-processes", "3", "--nodes", "2",
            "--machine-rank", "0", "--main-process-ip", "127.0.0.1"),
     f"{CONFIGS / 'accelerate' / 'cpu_ddp.yaml'}: num_processes 3 is not a multiple of num_machines 2"),
    ("a machine rank past the machines", "train", TINY,
     _plain("--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), "--nodes", "2", "--machine-rank", "5",
            "--main-process-ip", "127.0.0.1"), "--machine-rank: 5 is not one of the 2 machine(s) (0..1)"),
    ("plan: fewer rows than a batch", "plan", TINY, lambda tmp: ["train.max_steps=5", *_files(GOOD[: len(GOOD) // 40 * 20])(tmp)],
     "{tmp}/train.jsonl: 20 rows is fewer than train.global_batch_size (32)"),  # it printed 5 steps of none
    ("plan: a bad row of a CSV", "plan", TINY, _files("text,label\nWe may end it.,0\nWe may not.,maybe\n", "train.csv"),
     "{tmp}/train.csv:3: 'label' must be 0, 1, fair or unfair, or an UNFAIR-ToS category name; got 'maybe'; for your own classes set data.label_names"),
    ("accelerate config missing", "plan", TINY, _plain("--accelerate-config", "{tmp}/none.yaml"),
     "--accelerate-config: {tmp}/none.yaml: file not found"),
    ("DeepSpeed JSON not JSON", "plan", TINY, _ds_yaml('{"zero_optimization": {"stage": 2},\n  "bf16": {enabled: true}}'),
     "{tmp}/ds.json:2: invalid JSON"),
    ("DeepSpeed clipping disagrees", "plan", TINY, _ds_yaml({**ZERO2, "gradient_clipping": 5.0}),
     "{tmp}/ds.json: gradient_clipping: 5.0 but the run has 1.0"),
    ("batch over 8 GPUs", "plan", TINY, _plain("--nodes", "2", "--gpus-per-node", "8"), "train.global_batch_size: 32 is not divisible"),
    # ---- model, hub and tracker, found before or after the run directory exists
    ("hub model offline", "train", TINY, _plain("model.name=no-such-org/no-such-model"), "model.name: cannot load 'no-such-org/no-such-model'"),
    ("tracker does not answer", "train", TINY, _plain("tracking.uri=http://127.0.0.1:9"), "tracking.uri: http://127.0.0.1:9 does not answer"),
    ("LoRA target the model lacks", "train", TINY, _plain("model.lora.enabled=true", "model.lora.target_modules=[nonexistent]"),
     "model.lora.target_modules: nonexistent not among the linear or embedding layers"),
    ("tracker URI with a query token does not answer", "train", TINY, _plain("tracking.uri=http://127.0.0.1:9/?token=s3cret"),
     "tracking.uri: http://127.0.0.1:9/?token=*** does not answer"),
    # ---- a data cache strangers could fill
    ("world-writable cache", "train", TINY, _cache_dir(0o777), "data.cache_dir: {tmp}/cache may be written by anyone (mode 777)"),
    ("another user's cache", "train", TINY, _cache_dir(0o755, uid=54321), "data.cache_dir: {tmp}/cache belongs to another user (uid 54321)"),
    ("register without MLflow", "train", TINY, _plain("tracking.mlflow=false", "tracking.register_model=clauses"),
     "tracking.register_model: needs tracking.mlflow and tracking.log_model true"),
    ("negative system metrics interval", "train", TINY, _plain("tracking.system_metrics_every_s=-1"),
     "tracking.system_metrics_every_s: must be >= 0"),
    # ---- found probing from outside: each was a traceback, a crash or a silent acceptance
    ("JSONL line null first", "train", TINY, _files("null\n" + GOOD),  # a segfault in the JSON reader
     "{tmp}/train.jsonl:1: expected a JSON object ({{...}}) on each line; got 'null'"),
    ("JSON file null first", "train", TINY, _files("null\n" + GOOD, name="train.json"),
     "{tmp}/train.json: expected a JSON object or array first; got 'null'"),
    ("JSON lines in a .json file, null later", "train", TINY, _files(GOOD + "null\n" + GOOD, name="train.json"),
     "{tmp}/train.json:41: expected a JSON object"),
    ("JSONL line an array", "train", TINY, _files(GOOD + "[1, 2]\n"), "{tmp}/train.jsonl:41: expected a JSON object"),
    ("JSON object of columns", "train", TINY, _files('{"text": ["We may end it.", "We may not."],\n "label": [1, 0]}\n',
                                                     name="train.json"),  # ("no 'text' text in its first rows")
     "{tmp}/train.json: one JSON object of columns ('text', 'label': lists of 2); give rows: one JSON object per line "
     "(.jsonl) or a JSON array of objects"),
    ("learning rate NaN", "train", TINY, _plain("train.lr=nan"), "train.lr: must be > 0 and finite; got nan"),
    ("weight decay inf", "train", TINY, _plain("train.weight_decay=.inf"), "train.weight_decay: must be >= 0 and finite; got inf"),
    ("tiny model without heads", "train", TINY, _plain("model.tiny.num_heads=0"), "model.tiny.num_heads: must be > 0; got 0"),
    ("tiny model dropout 2", "train", TINY, _plain("model.tiny.dropout=2"), "model.tiny.dropout: must be in [0, 1); got 2.0"),
    ("negative seed", "train", TINY, _plain("train.seed=-1"), "train.seed: must be in [0, 2**32); got -1"),
    ("config not UTF-8", "train", None, lambda tmp: (tmp / "c.yaml").write_bytes(b"task: classification\n# caf\xe9\n")
     and [str(tmp / "c.yaml")], "{tmp}/c.yaml: not UTF-8 text"),
    ("a config section twice", "train", None, _write("c.yaml", "train:\n  lr: 1.0e-3\ntrain:\n  seed: 3\n", "{tmp}/c.yaml"),
     "{tmp}/c.yaml:3: not valid YAML ('train' appears twice in one mapping)"),
    ("accelerate process count a word", "plan", TINY, _write("a.yaml", "distributed_type: MULTI_GPU\nnum_processes: many\n",
                                                              "--accelerate-config", "{tmp}/a.yaml"),
     "{tmp}/a.yaml: num_processes: expected a whole number >= 1; got 'many'"),
    ("accelerate config a directory", "plan", TINY, _plain("--accelerate-config", "{tmp}"), "--accelerate-config: {tmp}: cannot be read"),
    ("synth into a file", "synth", None, _write("f.txt", "x", "{tmp}/f.txt"), "OUT_DIR: {tmp}/f.txt is a file, not a directory"),
    ("synth under a file", "synth", None, _write("f.txt", "x", "{tmp}/f.txt/syn"), "OUT_DIR: {tmp}/f.txt is a file, not a directory"),
    ("synth over data", "synth", None, _write("train.jsonl", GOOD, "{tmp}"),  # (it was replaced without a word)
     "OUT_DIR: {tmp}/train.jsonl exists; choose another directory, or remove it first"),
    ("export a checkpoint that is gone", "export", None, _plain("{tmp}/run/checkpoints/step-000008", "{tmp}/out"),
     "{tmp}/run/checkpoints/step-000008: no such checkpoint"),  # (was "not a complete checkpoint (no COMPLETE marker)")
    ("export under a file", "export", None, _write("f.txt", "x", "{tmp}/run/checkpoints/step-000008", "{tmp}/f.txt/out"),
     "OUT_DIR: {tmp}/f.txt is a file, not a directory"),  # (a NotADirectoryError traceback from mkdir)
    ("predict into a directory", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input", "{tmp}/x.txt", "--output", "{tmp}"),
     "--output: {tmp}: is a directory"),
    ("generate an empty prompt", "generate", None, _plain("no-model", "--prompt", "  "),  # (it was answered)
     "--prompt: empty: nothing to answer"),
    ("predict under a file", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input", "{tmp}/x.txt", "--output",
                                                     "{tmp}/x.txt/p.jsonl"),  # (it said "no such directory")
     "--output: {tmp}/x.txt/p.jsonl: {tmp}/x.txt is a file, not a directory"),
    ("predict into an empty name", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input", "{tmp}/x.txt",
                                                           "--output", ""),  # (stdout, without a word)
     "--output: empty; give a file, or - for standard output"),
    ("CSV with a header alone", "train", TINY, _files("text,label\n\n", name="train.csv"), "{tmp}/train.csv: no rows"),
    ("CSV with a quote left open", "train", TINY,  # (named the line where the row ended, nothing more)
     _files("text,label\n" + "We may end it.,1\n" * 40 + '"open,1\nWe may.,0\n"Fine, yes",0\n' + "Last.,1\n" * 4, "train.csv"),
     "{tmp}/train.csv:44: 3 fields where the header names 2 (this row runs from line 42: a quote left open there?)"),
    # (these three said "cannot be read as JSON lines (StopIteration)" or datasets' "Instruction
    # "train" corresponds to no data!"; eval said "no rows")
    ("JSONL empty", "train", TINY, _files(""), "{tmp}/train.jsonl: no rows"),
    ("JSONL blank lines only", "train", TINY, _files("\n  \n\r\n"), "{tmp}/train.jsonl: no rows"),
    ("JSONL an empty array", "train", TINY, _files("[]\n"), "{tmp}/train.jsonl: no rows"),
    ("JSONL gzip-compressed", "train", TINY, _files(gzip.compress(GOOD.encode())),  # (it said "UTF-16?")
     "{tmp}/train.jsonl:1: gzip-compressed, not text; decompress it first (gunzip)"),
    # Labels as numbers, then names after a blank line, then a bad one: the tiny tokenizer's read
    # checked no row, and the line went unnamed ("cannot be read as JSON lines").
    ("JSONL labels as numbers then names, a blank line, a bad label", "train", TINY,
     _files(GOOD + "\n" + GOOD.replace('"label": 1', '"label": "unfair"') + '{"text": "We may.", "label": "maybe"}\n'),
     "{tmp}/train.jsonl:82: 'label' must be 0, 1, fair or unfair, or an UNFAIR-ToS category name; got 'maybe'; for your own classes set data.label_names"),
    ("CSV header with a space after a comma", "train", TINY, _files("text, label\n" + "We may end it at any time.,1\n" * 40, "train.csv"),
     "{tmp}/train.csv: no 'label' or 'labels' column (its columns: 'text', ' label'); a column name has spaces around it"),
    ("CSV separated by semicolons", "train", TINY, _files("text;label\n" + "We may end it at any time.;1\n" * 40, "train.csv"),
     "{tmp}/train.csv: no 'text' and no 'label' or 'labels' column (its columns: 'text;label'); CSV columns are separated by commas"),
    ("predict an empty clause", "predict", None, _write("x.jsonl", '{"text": "We may end it."}\n{"text": "  "}\n', "no-model",
                                                        "--input", "{tmp}/x.jsonl"), "{tmp}/x.jsonl:2: missing or empty 'text'"),
    ("predict a CSV separated by semicolons", "predict", None, _write("x.csv", "id;text\n1;We may end it.\n2;We may not.\n", "no-model",
                                                                    "--input", "{tmp}/x.csv"),
     "--input: {tmp}/x.csv: no 'text' column (its columns: 'id;text'); CSV columns are separated by commas"),
    ("predict into a .csv file", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input", "{tmp}/x.txt",
                                                         "--output", "{tmp}/p.csv"),
     "--output: {tmp}/p.csv: predictions are written as JSON lines; name it p.jsonl"),
    ("eval of a folder that holds no model", "eval", None, _write("v1.jsonl", GOOD, "{tmp}", "--data", "{tmp}/v1.jsonl"),
     "MODEL_DIR: {tmp}: not a loadable Hugging Face model directory"),  # (it named model.name, which nobody set)
    ("eval of a folder", "eval", None, _plain("no-model", "--data", "{tmp}"),
     "--data: {tmp}: a directory; give a file (JSONL, CSV or Parquet; plain text for predict)"),
    ("predict an empty file", "predict", None, _write("x.txt", "\n \n", "no-model", "--input", "{tmp}/x.txt"),
     "--input: {tmp}/x.txt: no rows"),
    ("eval of a run directory", "eval", None, _run_dir_not_model, "MODEL_DIR: {tmp}/run is a run directory; its exported model is {tmp}/run/model"),
    ("predict with a checkpoint", "predict", None, _checkpoints("run/checkpoints/step-000008", "--input", "{tmp}/x.txt"),
     "MODEL_DIR: {tmp}/run/checkpoints/step-000008 is a checkpoint, not an exported model; "
     "`launcher export {tmp}/run/checkpoints/step-000008 OUT_DIR` writes one"),  # (transformers: "Should have a model_type key")
    ("eval with a run's checkpoints folder", "eval", None, _checkpoints("run/checkpoints", "--data", "{tmp}/x.txt"),
     "MODEL_DIR: {tmp}/run/checkpoints holds checkpoints but no exported model; "
     "`launcher export {tmp}/run/checkpoints/step-000008 OUT_DIR` writes one from the latest"),
    ("eval of a LoRA export's adapter", "eval", None, _lora_part("adapter", "--data", "{tmp}/x.txt"),
     "MODEL_DIR: {tmp}/model/adapter is the LoRA adapter of the export {tmp}/model; give {tmp}/model"),
    ("generate with a LoRA export's base", "generate", None, _lora_part("base", "--prompt", "hi"),
     "MODEL_DIR: {tmp}/model/base is the base model under the LoRA adapter of the export {tmp}/model; give {tmp}/model"),
    ("predict with an adapter that names no base", "predict", None,
     _lora_part("adapter", "--input", "{tmp}/x.txt", parent_meta=False),
     "MODEL_DIR: {tmp}/model/adapter is a LoRA adapter that names no base model"),
    ("generate with a run directory that has no model yet", "generate", None, _checkpoints("run", "--prompt", "hi"),
     "MODEL_DIR: {tmp}/run holds checkpoints but no exported model; "
     "`launcher export {tmp}/run/checkpoints/step-000008 OUT_DIR` writes one from the latest"),  # (it said: not a causal-LM export)
    ("predict with an unfinished checkpoint", "predict", None, _checkpoints("run/checkpoints/step-000012", "--input", "{tmp}/x.txt"),
     "MODEL_DIR: {tmp}/run/checkpoints/step-000012 is an incomplete checkpoint (no COMPLETE marker); "
     "`launcher export {tmp}/run/checkpoints/step-000008 OUT_DIR` writes a model from the latest complete one"),
    ("eval with a run directory whose checkpoints are all unfinished", "eval", None,
     _checkpoints("run", "--data", "{tmp}/x.txt", sealed=()),
     "MODEL_DIR: {tmp}/run holds no exported model and no complete checkpoint (3 without a COMPLETE marker, "
     "written in part): nothing to load or export yet"),  # (transformers: "Should have a model_type key")
    ("predict with an unfinished checkpoint that has no skeleton", "predict", None,
     _checkpoints("run/checkpoints/step-000004", "--input", "{tmp}/x.txt", sealed=(), skeleton=False),
     "MODEL_DIR: {tmp}/run/checkpoints/step-000004 is an incomplete checkpoint (no COMPLETE marker)"),
    ("predict into a place that takes no file", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input",
                                                                        "{tmp}/x.txt", "--output", "/proc/p.jsonl"),
     "--output: /proc/p.jsonl: cannot create a file in /proc (No such file or directory)"),  # before the model loads
    ("predict onto its own input", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input", "{tmp}/x.txt",
                                                          "--output", "{tmp}/./x.txt"),
     "--output: {tmp}/./x.txt: is the --input file; write the predictions elsewhere"),
    ("predict into a missing folder", "predict", None, _write("x.txt", "a clause\n", "no-model", "--input", "{tmp}/x.txt",
                                                             "--output", "{tmp}/none/p.jsonl"),
     "--output: {tmp}/none/p.jsonl: no such directory {tmp}/none"),
]


def test_the_table_is_wide():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, command, config, make, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, name, command, config, make, expected):
    work = tmp_path / "in"
    work.mkdir()
    out = tmp_path / "out"
    args = make(work)
    if command == "train" and "--output-dir" not in args:
        args = ["--output-dir", str(out), *args]
    head = [command] + ([str(config)] if config is not None else [])
    proc = launcher(*head, *args, timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert len(err) == 1, err
    assert err[0].startswith("error: " + expected.format(tmp=work)), err[0]
    assert "Failed to load JSON" not in proc.stderr  # (datasets' own line for a bad row, counted from 0)
    # Nothing left behind: no run directory, no MLflow store (a tokenized-data cache may stay).
    leftovers = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    assert set(leftovers) <= {".cache"}, leftovers


def test_the_slurm_entry_refuses_a_one_process_config_on_two_nodes_before_any_training_starts(tmp_path):
    """slurm/train.sh runs launcher.launch on each node, not `launcher train --accelerate-config`:
    with ACCELERATE_CONFIG=single_gpu.yaml and 2 nodes, accelerate's simple launcher ran one whole
    training per node, both writing the same run directory."""
    cmd = [sys.executable, "-m", "launcher.launch", "--config_file", str(CONFIGS / "accelerate" / "single_gpu.yaml"),
           "--num_machines", "2", "--num_processes", "2", "--machine_rank", "1", "--main_process_ip", "127.0.0.1",
           "-m", "launcher", "train", str(TINY), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"error: {CONFIGS / 'accelerate' / 'single_gpu.yaml'}: distributed_type: NO with 2 process(es) on 2 machine(s): "
        "accelerate launch starts ONE process on each machine, each a separate one-process training; use a distributed "
        "config (multi_gpu.yaml, multi_node.yaml, or cpu_ddp.yaml for CPU ranks)"]
    assert not (tmp_path / "out").exists()


def test_the_slurm_entry_refuses_a_run_the_launch_cannot_split_once_before_any_rank_starts(tmp_path):
    """The README's ZeRO-3 Slurm example (a global batch of 8 on 16 GPUs) got its allocation and
    then every rank refused the batch, one line each: now the node's launch checks the run as
    `launcher train --accelerate-config` does, once, and starts no rank."""
    cmd = [sys.executable, "-m", "launcher.launch", "--config_file", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"),
           "--num_processes", "2", "-m", "launcher", "train", str(TINY), "--output-dir", str(tmp_path / "out"),
           "train.global_batch_size=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: train.global_batch_size: 3 is not divisible by train.micro_batch_size (16) x world size (2) = 32; "
        "no micro-batch size does on 2 ranks: use a number of ranks that divides it"]
    assert not (tmp_path / "out").exists()


def test_a_trained_head_with_the_classes_in_another_order_is_one_line(tmp_path):
    """A classifier checkpoint keeps its head when the run has as many classes (a new head is
    made only for another count) and takes the run's names: the same classes in another order
    trained from swapped classes without a word. One line naming the class and the model's
    order, before anything is written; the model's own order, or names it does not have, pass."""
    from transformers import BertConfig, BertForSequenceClassification

    from launcher import tasks
    from launcher.config import load_config
    from launcher.data import synthetic
    from launcher.data.tokenizer import train_wordpiece

    model = tmp_path / "sentiment"
    names = ["negative", "neutral", "positive"]
    BertForSequenceClassification(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, num_labels=3, id2label=dict(enumerate(names)),
                                             label2id={n: i for i, n in enumerate(names)})).save_pretrained(model)
    train_wordpiece([r["text"] for r in synthetic.generate_clauses(50)], 400, 64).save_pretrained(model)
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": names[i % 3]}) + "\n" for i in range(6)))
    own = [f"model.name={model}", "data.mode=multiclass", "data.synthetic.enabled=false", f"data.train_file={data}",
           f"data.validation_file={data}"]
    out = tmp_path / "out"
    proc = launcher("train", str(TINY), *own, "data.label_names=[positive,neutral,negative]", "--output-dir", str(out),
                    timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: data.label_names: 'positive' is class 0 here but class 2 of the trained head of {model} (negative, "
        "neutral, positive); give data.label_names in the model's order"]
    assert not out.exists()
    for ok in (names, ["Negative", "Neutral", "Positive"], ["ham", "spam", "eggs"]):
        tasks.for_config(load_config(TINY, [*own, f"data.label_names=[{','.join(ok)}]"])).check_model_source()


def test_the_suite_clears_a_killed_sessions_build_lock_and_waits_out_a_build_at_work(tmp_path):
    """conftest.clear_build_locks, run at the session's start on the suite's kernel folder: a
    lock whose folder is quiet is removed at once; one of a build at work (its folder changing,
    then the lock removed by the build) is waited for, not removed; a lock that stays but whose
    folder falls quiet is removed once quiet_s has passed."""
    import threading

    from conftest import clear_build_locks

    def lock(name: str, age_s: float) -> Path:
        (tmp_path / name).mkdir()
        path = tmp_path / name / "lock"
        path.touch()
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    killed = lock("deepspeed_shm_comm", 3600)
    said: list = []
    assert clear_build_locks(tmp_path, quiet_s=600, say=said.append) == [killed] and not killed.exists()
    building = lock("cpu_adam", 0)

    def build():  # writes an object, then ends and removes its lock (1.5 s before it would be quiet for 3 s)
        time.sleep(1.5)
        (tmp_path / "cpu_adam" / "cpu_adam.o").touch()
        time.sleep(1.5)
        building.unlink()

    threading.Thread(target=build).start()
    said.clear()
    assert clear_build_locks(tmp_path, quiet_s=3, poll_s=0.1, say=said.append) == []
    assert said == [f"waiting for a kernel build in {tmp_path} (a lock unchanged for 3 s is removed)"]
    left = lock("fused_adam", 0)  # young, and nothing finishes it
    assert clear_build_locks(tmp_path, quiet_s=0.5, poll_s=0.1, say=said.append) == [left] and not left.exists()


def test_every_process_waits_on_the_kernel_build_lock_even_for_a_kernel_built_long_ago():
    """Why a stale lock is met at all: torch's extension builder keeps its record of built
    kernels in the process, so each process's first load of DeepSpeed's CPU collectives takes
    <kernel>/lock (and waits while another holds it), even when the kernel was built long ago;
    build.ninja names the checkout's own torch, so a second checkout's load builds the kernel
    again in a shared folder. A process killed in either moment leaves the lock (the suite
    builds into its own folder for this: conftest)."""
    load = [sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
            "ShareMemCommBuilder().load(verbose=False)"]
    folder = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    check(subprocess.run(load, capture_output=True, text=True, timeout=600))  # built, if not already
    built = (folder / "deepspeed_shm_comm.so").stat().st_mtime
    (folder / "lock").touch()  # another process's, at work
    try:
        proc = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=15)  # waits on it (importing deepspeed takes 2-5 s)
    finally:
        (folder / "lock").unlink(missing_ok=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert (folder / "deepspeed_shm_comm.so").stat().st_mtime == built  # and then loads the built kernel
    assert not (folder / "lock").exists()


def test_a_deepspeed_build_lock_left_by_a_killed_build_is_one_line_not_a_silent_wait(tmp_path, monkeypatch):
    """torch's extension builder (which compiles DeepSpeed's kernels, e.g. its CPU shared-memory
    collectives, at the first launch) waits forever for a lock that a killed build left."""
    from launcher import engines

    ext = tmp_path / "ext"

    def lock(name: str, age_s: int, fresh_file: bool = False) -> Path:
        (ext / name).mkdir(parents=True)
        path = ext / name / "lock"
        for f in (path, ext / name / "build.ninja"):
            f.touch()
            os.utime(f, (f.stat().st_mtime - age_s,) * 2)
        if fresh_file:  # a build at work writes its objects
            (ext / name / "shm.o").touch()
        return path

    stale = lock("deepspeed_shm_comm", 7200)
    lock("cpu_adam", 7200, fresh_file=True)  # an old lock, but its build is still writing
    lock("fused_adam", 60)  # a build that began a minute ago
    lock("someone_elses_op", 7200)  # not a kernel DeepSpeed builds
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    assert engines.stale_build_locks() == [(stale, pytest.approx(7200, abs=60))]

    out = tmp_path / "out"
    proc = launcher("train", str(TINY), "--accelerate-config", str(CONFIGS / "accelerate" / "deepspeed_zero2.yaml"),
                    "--num-processes", "2", "--output-dir", str(out), timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert err == [f"error: {stale}: a DeepSpeed kernel build left this lock 120 minutes ago and nothing in its "
                   "folder changed since (killed?); every DeepSpeed launch waits on it forever: delete it unless a "
                   "build is running"]
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".cache"}


@pytest.mark.parametrize("args", [
    ["eval", "m", "--data", "d.jsonl", "--batch-size", "0"],
    ["eval", "m", "--data", "d.jsonl", "--max-length", "0"],
    ["generate", "m", "--prompt", "hi", "--max-new-tokens", "0"],
    ["predict", "m", "--input", "x.txt", "--batch-size", "-1"],
    ["predict", "m", "--input", "x.txt", "--max-length", "many"],
    ["plan", "c.yaml", "--nodes", "0"],
    ["train", "c.yaml", "--num-processes", "0"],
    ["synth", "s", "--n-train", "-5"],
    ["synth", "s", "--n-validation", "0"],
], ids=["eval batch 0", "eval max-length 0", "generate 0 tokens", "predict batch -1", "predict max-length text",
        "plan 0 nodes", "train 0 processes", "synth -5 rows", "synth 0 validation rows"])
def test_a_count_below_one_on_the_command_line_is_refused_before_anything_loads(tmp_path, args):
    """Batch sizes, lengths and token counts of eval, generate and predict are whole numbers of
    at least 1, checked with the arguments: a batch size of 0 was a traceback inside the
    evaluation (range() arg 3 must not be zero), 0 or -3 new tokens one inside generate."""
    proc = launcher(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    flag, value = args[-2:]
    assert proc.stderr.splitlines() == [f"launcher {args[0]}: error: argument {flag}: expected an integer >= 1; got "
                                        f"'{value}' (usage: launcher {args[0]} --help)"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, line", [
    ([], "launcher: error: the following arguments are required: command (usage: launcher --help)"),
    (["trian", "c.yaml"], "launcher: error: argument command: invalid choice: 'trian' (choose from 'train', 'eval', "
     "'generate', 'predict', 'plan', 'export', 'env', 'synth') (usage: launcher --help)"),
    (["train"], "launcher train: error: the following arguments are required: config (usage: launcher train --help)"),
    (["eval", "m"], "launcher eval: error: the following arguments are required: --data (usage: launcher eval --help)"),
    (["train", "c.yaml", "--bogus"], "launcher train: error: unrecognized arguments: --bogus (usage: launcher train --help)"),
    (["predict", "m", "--input", "x", "y=1"], "launcher predict: error: unrecognized arguments: y=1 (usage: launcher predict --help)"),
    (["predict", "m", "--inptu", "x"],  # (it said "--input is required", the misspelling unsaid)
     "launcher predict: error: unrecognized arguments: --inptu (usage: launcher predict --help)"),
], ids=["no command", "misspelt command", "train without config", "eval without data", "unknown flag", "stray override",
        "misspelt required flag"])
def test_a_wrong_command_line_is_one_line_naming_the_help(tmp_path, args, line):
    """argparse's own errors printed its usage block (3 to 5 lines) above the error; `launcher
    train` alone also named the optional overrides as required ("config, key=value")."""
    proc = launcher(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line], proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_a_machine_rank_is_checked_against_the_machines_the_accelerate_config_names(tmp_path, monkeypatch, capsys):
    """multi_node.yaml names 2 machines: --machine-rank 1 without --nodes is the second, and
    was refused as "not one of the 1 machine(s)"; 2 is none of them."""
    from launcher.cli import main

    launched = []

    def execve(path, argv, env):
        launched.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    args = ["train", str(TINY), "--accelerate-config", str(CONFIGS / "accelerate" / "multi_node.yaml"), "--main-process-ip",
            "127.0.0.1", "--output-dir", str(tmp_path / "out"), "train.global_batch_size=256"]
    with pytest.raises(SystemExit):
        main([*args, "--machine-rank", "1"])
    assert launched and launched[0][launched[0].index("--machine_rank") + 1] == "1"
    assert main([*args, "--machine-rank", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: --machine-rank: 2 is not one of the 2 machine(s) (0..1)"
    assert len(launched) == 1


def test_a_port_out_of_range_is_refused_with_the_arguments(tmp_path):
    """--main-process-port 99999 passed the checks, printed "checked", then died in the rendezvous
    with an OverflowError traceback."""
    proc = launcher("train", str(TINY), "--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"),
                    "--main-process-port", "99999", "--output-dir", str(tmp_path / "out"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "checked" not in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["launcher train: error: argument --main-process-port: expected a port in 1..65535; "
                                        "got '99999' (usage: launcher train --help)"]
    assert not (tmp_path / "out").exists()


def test_a_synthetic_seed_out_of_range_is_refused_with_the_arguments(tmp_path):
    """`launcher synth --seed -1` took the seed's absolute value where data.synthetic.seed in
    a config refuses it: one rule, [0, 2**32)."""
    proc = launcher("synth", "s", "--seed", "-1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["launcher synth: error: argument --seed: expected an integer in [0, 2**32); got "
                                        "'-1' (usage: launcher synth --help)"]
    assert not list(tmp_path.iterdir())


def test_a_failed_start_leaves_the_runs_that_share_its_new_output_directory(tmp_path):
    """Jobs of an array started together into a new output directory each saw it absent. The
    one that failed on bad input removed the whole directory: its siblings' run directories
    and the MLflow store they log to, while they trained. Now a failed start removes its own
    run directory, and the directory and store only when no other run is in it."""
    import socket

    from launcher import cli, owner
    from launcher.config import load_config

    out = tmp_path / "sweep"
    cfg = load_config(str(TINY), [], output_dir=str(out), run_name="lr3")
    created = cli._what_this_attempt_creates(cfg)
    assert created["output_dir"] == out and created["store"] == out / "mlflow.db"
    sibling = out / "lr1" / "checkpoints"  # another job of the array, started at the same moment
    sibling.mkdir(parents=True)
    (out / "mlflow.db").write_bytes(b"SQLite format 3\0")
    _take(cfg.run_dir)  # ours, failed before a checkpoint
    cli._remove_created(created)
    assert sorted(p.name for p in out.iterdir()) == ["lr1", "mlflow.db"] and sibling.is_dir()
    # Alone in it, a failed start leaves nothing, as before.
    _take(cfg.run_dir)
    (out / "lr1").rename(tmp_path / "elsewhere")
    cli._remove_created(created)
    assert not out.exists()
    # A launch of the same --run-name took it meanwhile (this one was refused): nothing goes,
    # even where that launch's pid is this one's (another container sharing the host name).
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    (cfg.run_dir / owner.LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                            "token": "another launch's"}))
    cli._remove_created(created)
    assert sorted(p.name for p in out.iterdir()) == ["lr3"] and (cfg.run_dir / "checkpoints").is_dir()


def test_a_failed_start_into_a_new_nested_output_directory_leaves_no_folder_above_it(tmp_path):
    """--output-dir new1/new2 where neither exists, and bad input found once the run has begun
    (an empty tracking.experiment): the run's mkdir made new1 too, which stayed, empty. Now
    nothing is left; a folder above that another job wrote in meanwhile stays."""
    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path / "new1" / "new2"), *FAST, "tracking.experiment=")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: tracking: MLflow at ") and "Invalid experiment name" in error, error
    assert sorted(tmp_path.iterdir()) == []

    from launcher import cli
    from launcher.config import load_config

    cfg = load_config(str(TINY), [], output_dir=str(tmp_path / "a" / "b" / "c"), run_name="r")
    created = cli._what_this_attempt_creates(cfg)
    assert created["above"] == [tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "theirs").mkdir()
    cli._remove_created(created)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "theirs"]


def _take(run_dir: Path) -> None:
    """The run directory, taken by this process as a launch takes it (its lease)."""
    from launcher import owner

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    assert owner.take_lease(run_dir, None) is None


def test_a_launch_refused_a_run_name_that_another_took_meanwhile_leaves_that_run_alone(tmp_path):
    """Two launches of one --run-name started together into a new output directory both saw
    the run directory absent, so the one refused (a launch is in it) removed it as its own,
    and the output directory and MLflow store with it, while the other trained: that one died
    of a missing file, or finished without its config.yaml and lease. Here the second is
    stopped once it noted what it would create; the first takes the run directory; then the
    second goes on, is refused in one line, and the first finishes untouched."""
    import psutil

    out = tmp_path / "out"
    args = [sys.executable, "-m", "launcher", "train", str(TINY), "--output-dir", str(out), "--run-name", "same",
            "train.max_steps=4", "checkpoint.every_steps=2", "eval.every_steps=2"]
    env = {**os.environ, **OFFLINE_ENV}
    second = subprocess.Popen(args, cwd=ROOT, env={**env, "LAUNCHER_FAILPOINT": "started"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    first = None
    try:
        deadline = time.time() + 120
        while psutil.Process(second.pid).status() != psutil.STATUS_STOPPED:  # at the fail point
            assert second.poll() is None and time.time() < deadline, second.communicate()
            time.sleep(0.05)
        assert not out.exists()
        first = subprocess.Popen(args, cwd=ROOT, env={**env, "LAUNCHER_STALL": "0:2:15"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        while not (out / "same" / ".lease").is_file():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second.send_signal(signal.SIGCONT)
        _, err = second.communicate(timeout=120)
        refused = [x for x in err.splitlines() if x.startswith("error:")]
        assert second.returncode == 2 and "Traceback" not in err and len(refused) == 1 and ("a launch is in it" in refused[0]  # before its checkpoint
                                                                 or "is in use by another launch" in refused[0]), err[-2000:]
        assert (out / "same" / "config.yaml").is_file() and (out / "same" / ".lease").is_file()
        done, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        for proc in (second, first):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert (out / "same" / "model" / "model.safetensors").is_file() and (out / "same" / "config.yaml").is_file()
    (run,) = all_runs(mlflow_client(out))  # the store it logs to is whole, with its one run
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("env", [{"TORCHELASTIC_RUN_ID": "none", "LOCAL_RANK": "0"},
                                 {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}],
                         ids=["torchrun", "one-process"])
def test_accelerate_config_inside_a_launch_is_refused_before_any_rank_starts_another(tmp_path, env):
    """`accelerate launch -m launcher train CONFIG --accelerate-config F` (the old help read as
    an instruction to do so): each rank became a launch of its own, N x N processes. Now a
    rank refuses it in one line, exit 2."""
    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path / "out"), "--accelerate-config",
                    str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == [line for line in errors if line.startswith("error: --accelerate-config: this process is already one rank")]
    assert len(errors) == 1 and not (tmp_path / "out").exists()


def test_a_container_hooks_local_rank_is_no_launch(tmp_path):
    """Container hooks under srun (pyxis's PyTorch hook) export LOCAL_RANK, RANK and WORLD_SIZE
    to every task: `srun --container-image=... launcher train --accelerate-config F` was refused
    as if it ran inside a launch. The check goes past it (to the next one, here --nodes')."""
    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path / "out"), "--accelerate-config",
                    str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), "--nodes", "2",
                    env={"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "1"})  # (a user's switch)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --nodes: more than one machine needs --machine-rank" in proc.stderr, proc.stderr


@pytest.mark.parametrize("model_file", ["config.json", "adapter_config.json", "model.gguf"])
def test_a_model_folder_named_or_holding_like_a_checkpoint_is_not_taken_for_one(tmp_path, model_file):
    """A plain Hugging Face model, a PEFT adapter or a GGUF folder (no launcher.json) named step-N,
    or holding step-N folders of its own, is read as a model: no line of ours, the loader reads it.
    Without its model file the same folders are a checkpoint and a run directory."""
    from launcher.cli import _not_an_export
    from launcher.errors import UserError

    named, holding = tmp_path / "step-000004", tmp_path / "holding"
    (holding / "step-1").mkdir(parents=True)
    named.mkdir()
    with pytest.raises(UserError, match="is an incomplete checkpoint"):
        _not_an_export(named)
    with pytest.raises(UserError, match="no complete checkpoint"):
        _not_an_export(holding)
    for folder in (named, holding):
        (folder / model_file).write_text("{}")
        _not_an_export(folder)


def test_predict_reads_a_saved_model_in_a_folder_named_like_a_checkpoint(tmp_path):
    """A tiny BERT classifier written by save_pretrained into a folder named step-N that also
    holds a step-N folder of its own: `launcher predict` loads it with from_pretrained and
    answers every line, rather than calling it a checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification

    from launcher.data import synthetic
    from launcher.data.tokenizer import train_wordpiece

    folder = tmp_path / "step-000004"
    (folder / "step-000002").mkdir(parents=True)
    tok = train_wordpiece([r["text"] for r in synthetic.generate_clauses(100)], 200, 64)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "x.txt").write_text("a clause\nanother clause\n")
    proc = launcher("predict", str(folder), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
