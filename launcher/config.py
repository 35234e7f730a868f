"""Typed run config: YAML + dotted `key=value` overrides -> validated dataclasses.

Every default lives here, next to the field it belongs to, and the comment above
a field is its documentation. Nothing heavy is imported: a bad config fails in well under a second,
before torch loads and long before any process group starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from launcher import owner
from launcher.errors import ConfigError
from launcher.files import file_in_the_way

# The 8 UNFAIR-ToS categories (LexGLUE), in the dataset's label-id order.
UNFAIR_TOS_CATEGORIES = [
    "Limitation of liability",
    "Unilateral termination",
    "Unilateral change",
    "Content removal",
    "Contract by using",
    "Choice of law",
    "Jurisdiction",
    "Arbitration",
]
BINARY_LABELS = ["fair", "unfair"]
TINY_MODEL = "tiny"
TINY_POSITIONS = 65536  # the longest data.max_length a tiny model with learned positions is built for


@dataclass(frozen=True)
class TinyModelConfig:
    # Architecture of the random model built when model.name is "tiny": auto is a
    # BERT encoder for classification and a Llama-style decoder for causal_lm.
    arch: Literal["auto", "bert", "llama", "gpt2"] = "auto"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    # Size of the WordPiece vocabulary trained locally on the training texts.
    vocab_size: int = 2000
    dropout: float = 0.1


@dataclass(frozen=True)
class LoraConfig:
    # Train low-rank adapters (peft) instead of all weights; the task head stays trainable.
    enabled: bool = False
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    # Module names to adapt (e.g. [q_proj, v_proj]); "all-linear": every linear layer but the head.
    target_modules: Any = "all-linear"
    # Modules trained in full beside the adapters (a classifier's head is always one).
    modules_to_save: list[str] = field(default_factory=list)
    # DoRA (peft): each adapted weight also learns its per-column magnitude.
    use_dora: bool = False
    # Adapt only these transformer blocks (0 = nearest the input; e.g. [20, ..., 29]): the
    # backward pass stops at the lowest one, so the upper third of a deep model trains in
    # about half the time. None: every block.
    layers_to_transform: Optional[list[int]] = None


@dataclass(frozen=True)
class ModelConfig:
    # Hub id, local directory (Hugging Face format), a GGUF file (or a directory holding one:
    # converted once into the data cache, then loaded as a plain model), or "tiny" for a
    # random model with a tokenizer trained on the training data (offline; tests and demo).
    name: str = TINY_MODEL
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # causal_lm with LoRA on a pretrained model: load the frozen base through bitsandbytes in
    # 4-bit NF4 (QLoRA) or 8-bit; the adapters train in fp32. One process for now. The
    # merged export dequantizes the base and adds the adapters: a plain model.
    quantization: Literal["none", "nf4", "int8"] = "none"
    # Attention kernel. auto: flash_attention_2 for bf16/fp16 runs on CUDA when flash-attn is
    # installed (it cannot run fp32), else sdpa, or eager for a model without sdpa (DeBERTa).
    # Packed causal-LM rows are exact under each:
    # under flash attention each micro-batch is flattened into one row with its examples'
    # boundaries (cu_seq_lens), so examples never attend to each other.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # Hub revision (branch, tag or commit) of model.name; null: the default branch.
    revision: Optional[str] = None
    # Run the model repository's own Python code (custom architectures). Off unless asked:
    # it executes whatever the repository holds.
    trust_remote_code: bool = False
    # Weight dtype. auto: float32 wherever the engine keeps no fp32 master copy (one process,
    # DDP: AdamW would round small updates of bf16 weights to zero; compute is bf16 through
    # autocast with train.precision=bf16); bfloat16 under DeepSpeed/FSDP with train.precision=bf16
    # (the engine keeps fp32 masters) and for LoRA's frozen base weights (adapters stay float32).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # classification: how the head reads a text. cls: the architecture's own head (a BERT
    # encoder's dense+tanh pooler over [CLS]; a decoder LLM's last token). mean: the mean of the
    # last hidden states over the text's tokens, as sentence encoders (all-MiniLM-L6-v2) were
    # trained to be read; BERT-family encoders and decoder LLMs (Llama-family and GPT-2 heads).
    # The export records it for eval, predict, export.
    pooling: Literal["cls", "mean"] = "cls"


@dataclass(frozen=True)
class SyntheticDataConfig:
    # Generate clause-like sentences with a learnable signal instead of reading files.
    enabled: bool = False
    n_train: int = 1000
    n_validation: int = 250
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # Local JSONL / CSV / Parquet file, or a directory written by Dataset.save_to_disk
    # (a DatasetDict directory: the split is picked by data.train_split / validation_split).
    # Classification rows: `text` and `label` or `labels`; causal_lm rows: see README.
    # null: use data.hub_dataset (or data.synthetic when enabled).
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    # Hub dataset id, or a local directory of data files standing in for one.
    hub_dataset: str = "coastalcph/lex_glue"
    hub_config: str = "unfair_tos"
    # Split names in a hub dataset or a DatasetDict directory.
    train_split: str = "train"
    validation_split: str = "validation"
    # Where tokenized splits are kept (memory-mapped Arrow); null: <output_dir>/.cache.
    # Built once by one process per cache directory: a directory every node sees is built
    # once per job; a node-local one (e.g. /tmp) once on every node.
    cache_dir: Optional[str] = None
    # A cache your group shares: created group-writable (2770) and used when a group member
    # owns it. Off: the cache is private (0700) and refused when another user owns it.
    cache_shared: bool = False
    # Processes that tokenize a split; null: 1 below 20,000 rows, else the CPUs (at most 8).
    num_proc: Optional[int] = None
    # Batches of similar length (sorted within mega-batches of 50 global batches, then
    # shuffled; the longest first): far less padding. null: on for classification, off for causal_lm.
    group_by_length: Optional[bool] = None
    # DataLoader worker processes that collate micro-batches (0: in the training process).
    num_workers: int = 1
    # binary: two classes (fair/unfair: unfair = any UNFAIR-ToS category); multiclass: one of
    # data.label_names per row (softmax over them); multilabel: one sigmoid output per label name.
    mode: Literal["binary", "multiclass", "multilabel"] = "binary"
    # Class names; null means fair/unfair (binary) or the 8 UNFAIR-ToS categories (multilabel);
    # multiclass names its own. A row's label equal to a name is that class, then an id.
    label_names: Optional[list[str]] = None
    # classification: the column a row's text is in, and its label's (null: `label` or
    # `labels`), e.g. sentence and sentiment; recorded in the export for eval and predict.
    text_column: str = "text"
    label_column: Optional[str] = None
    max_length: int = 128
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # causal_lm: prompt for rows with `instruction` (and `input`); the response follows it.
    # A literal brace is {{ or }}.
    prompt_template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    prompt_template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    # causal_lm: one chat turn, for `messages` rows when the tokenizer has no chat template.
    chat_turn_template: str = "<|{role}|>\n{content}\n"
    # causal_lm: the system prompt of rows that have none (the first turn under a chat template,
    # else a paragraph before the instruction); recorded in the export for generate and predict.
    # null: none is added (a chat template's own default, if any, applies in training and after).
    system_prompt: Optional[str] = None
    # causal_lm: the user's turn and the answer built from a row's own columns with {column}
    # placeholders, e.g. prompt "Is this clause fair?\n\n{text}", response "{category}". null: rows
    # come as instruction/output, messages, prompt/completion or ShareGPT conversations.
    prompt: Optional[str] = None
    response: Optional[str] = None
    # causal_lm: train on at most this many rows per distinct answer (a fixed-seed choice, the
    # same in every run): balances a classification posed as generation. null: every row.
    max_rows_per_answer: Optional[int] = None
    # causal_lm: rows longer than max_length are cut at max_length (truncate) or left out (drop).
    truncation: Literal["truncate", "drop"] = "truncate"
    # causal_lm: concatenate examples into max_length blocks; attention never crosses examples.
    packing: bool = False

    def resolved_label_names(self) -> list[str]:
        if self.label_names:
            return list(self.label_names)
        return list(BINARY_LABELS if self.mode == "binary" else UNFAIR_TOS_CATEGORIES if self.mode == "multilabel" else [])


@dataclass(frozen=True)
class TrainConfig:
    # Used when max_steps is null.
    epochs: int = 3
    # Total optimizer steps; overrides epochs and sets the LR schedule's length.
    max_steps: Optional[int] = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    # Warmup as a fraction of total steps (ignored when warmup_steps is set).
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None
    # Examples per optimizer step, across all ranks. Invariant under world size:
    # accumulation = global_batch_size / (micro_batch_size * world_size).
    global_batch_size: int = 32
    # Examples per forward pass on one rank.
    micro_batch_size: int = 8
    max_grad_norm: Optional[float] = 1.0
    precision: Literal["no", "bf16", "fp16"] = "no"
    # With bf16/fp16: gradients are reduced across ranks in fp32 (DeepSpeed's
    # communication_data_type, and under ZeRO-2/3 its grad_accum_dtype for the sum over
    # micro-batches; FSDP's reduce and output dtypes); false: in the compute dtype,
    # half the gradient traffic for a less exact sum. DDP reduces fp32 gradients either way.
    reduce_in_fp32: bool = True
    seed: int = 42
    # none, or balanced: CE class weights n / (k n_c) (binary, multiclass) / BCE pos_weight (multilabel)
    # from training label frequencies; eval/loss then weighs alike (launcher eval too).
    class_weighting: Literal["none", "balanced"] = "none"
    # Recompute each layer's activations in the backward pass (non-reentrant): activation
    # memory falls from O(layers) to about one layer's, for about a third more compute.
    gradient_checkpointing: bool = False
    # causal_lm: apply the LM head to this many response tokens at a time, their gradients
    # made in the forward pass, so sequence x vocabulary float32 logits never exist at once
    # (evaluation too; every engine); checked once against the model's own loss before the
    # first step, which is used instead (one line) when they differ; 0: the model's own loss
    # (full logits).
    loss_chunk_tokens: int = 256
    # Peak dense TFLOP/s of one GPU at this precision, for train/mfu; null: known for
    # A100, H100 and H200 (bf16 or TF32), else no MFU is reported.
    peak_tflops: Optional[float] = None
    # Seconds a rank may wait in a collective (e.g. while a checkpoint is written) before the
    # process group gives up; tokenizing never waits in one (the other ranks watch the cache).
    collective_timeout_s: int = 1800
    # A rank with no progress (no step or eval batch ends) for this long writes its stacks
    # to RUN/ranks/rank-N.stack and rank 0 reports which ranks are behind and where; the run
    # goes on (the collective timeout decides). Checkpoints and exports are slow, not hung:
    # not watched. 0: off.
    hang_timeout_s: float = 600.0
    # Stop after checkpointing at this step without finishing the schedule
    # (rehearses an interruption; resume continues to max_steps).
    halt_at_step: Optional[int] = None


@dataclass(frozen=True)
class EvalConfig:
    # Evaluate every N optimizer steps (0: only at start and end).
    every_steps: int = 50
    at_start: bool = True
    # Metric that picks the best checkpoint and drives early stopping;
    # null: macro_f1 (classification) or loss (causal_lm).
    metric: Optional[str] = None
    # Stop after this many evaluations without improvement (0: never).
    early_stopping_patience: int = 0
    # classification: after training, tune the decision cut on validation (binary: one
    # probability cut; multilabel: one per category) and store it in model/launcher.json.
    # The robust rule: keep 0.5 unless it scores more than 0.01 below the best cut in
    # [0.1, 0.9]; then the middle of the plateau of cuts within 0.01 of the best F1.
    # Off by default: on a small validation set a free cut overfits.
    tune_threshold: bool = False
    micro_batch_size: Optional[int] = None
    # causal_lm: prompts answered greedily at step 0 and every eval (logged as a table); empty:
    # the first validation rows' answers are shown instead.
    generation_prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    # causal_lm: at every evaluation, answer this many validation rows (the first ones) greedily
    # and score them against their references: exact_match, and over a closed answer set
    # (at most 50 distinct training answers) accuracy, macro_f1 and the likeliest candidate's
    # choice_accuracy, choice_macro_f1. null: every row; 0: none (loss and perplexity only).
    generate_rows: Optional[int] = None


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every N optimizer steps (0: only at the end).
    every_steps: int = 50
    # Keep the newest K complete checkpoints, plus the best one by eval.metric.
    keep_last: int = 2
    keep_best: bool = True
    # What model/ holds: best, the weights of the evaluation with the best eval.metric (kept
    # as a weights-only snapshot in RUN/best, in export_dtype, replaced when beaten; a
    # checkpoint of that step instead for LoRA on a pretrained base, and under DeepSpeed with
    # another export dtype than the 16-bit weights); last, the final weights.
    export: Literal["best", "last"] = "best"
    # The dtype of model/'s weights, the same from the run and from `launcher export`: auto,
    # the dtype the base model's config.json declares (float32 for a tiny random model or
    # when it declares none). Under DeepSpeed an export in another dtype than the trained
    # 16-bit weights is read from the fp32 master weights of the exported step's checkpoint.
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: continue from the run directory's latest complete checkpoint;
    # never: fail if the run directory exists; or a checkpoint directory path.
    resume: str = "auto"
    # Load a checkpoint named in checkpoint.resume that your launcher did not write (another
    # user's, a download): resuming unpickles it, which can run any code.
    trust: bool = False
    # A resume in the run's directory with a changed task, model, data, seed, global batch or
    # optimisation: refuse (another run), or allow (listed and recorded like any other change).
    resume_changed: Literal["refuse", "allow"] = "refuse"


@dataclass(frozen=True)
class TrackingConfig:
    # MLflow tracking URI; null: sqlite:///<output_dir>/mlflow.db (no server).
    uri: Optional[str] = None
    experiment: str = "launcher"
    mlflow: bool = True
    wandb: bool = False
    # null: W&B's own environment decides (WANDB_PROJECT, else "launcher"; WANDB_MODE, else online).
    wandb_project: Optional[str] = None
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None
    # Record train metrics every N steps, and at a stop between (train/loss: the mean of those steps' losses); they are
    # sent in batches (one synchronous MLflow call cost about 33 ms here, longer than a tiny step).
    log_every_steps: int = 1
    # Off a terminal (Slurm, nohup), where there is no progress bar: a plain line with step,
    # loss, lr, tokens/s and ETA at most this often (and at the last step); 0: none.
    print_every_s: float = 30.0
    flush_every_steps: int = 25
    # A tracking server that stops answering mid-run never stops training: calls queue and
    # are retried (metrics.jsonl has everything). The end of a finished run waits this long
    # for the server to come back before giving up on what is still queued (calls that keep
    # going, such as a large model upload, are waited for, up to 6 times as long in all).
    outage_wait_s: float = 300.0
    # MLflow: the exported model as the run's logged model (its files as the model's
    # artifacts), and registered as a new version of this name when set.
    log_model: bool = True
    register_model: Optional[str] = None
    # MLflow: the train and validation data as run inputs (name, digest, source, rows).
    log_datasets: bool = True
    # MLflow's system metrics (CPU, memory, disk, network; GPUs with pynvml), sampled every N
    # seconds on rank 0; 0: off.
    system_metrics_every_s: float = 10.0


@dataclass(frozen=True)
class RunConfig:
    # Dotted keys the user set (YAML or override), so a default can yield to another file
    # (e.g. an accelerate YAML's mixed_precision) while an explicit choice cannot.
    explicit: typing.ClassVar[frozenset] = frozenset()

    task: Literal["classification", "causal_lm"] = "classification"
    # Run directory is output_dir/run_name; run_name defaults to the config file's stem.
    run_name: Optional[str] = None
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def replace(self, **changes) -> "RunConfig":
        """A copy with `changes` (whole sections), keeping the record of the user's explicit keys
        (dataclasses.replace alone would drop it)."""
        return with_explicit(dataclasses.replace(self, **changes), self.explicit)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / str(self.run_name)

    @property
    def eval_metric(self) -> str:
        return self.eval.metric or ("loss" if self.task == "causal_lm" else "macro_f1")

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return "sqlite:///" + str((Path(self.output_dir) / "mlflow.db").resolve())


@dataclass(frozen=True)
class TaskConfig:
    """What a task reads of a run: its model, data and evaluation sections, and the training
    settings that shape its model or its loss. A task gets this, never the whole RunConfig
    (which holds launch, checkpoint and tracking settings it has no business with). The
    sections are the RunConfig's own objects, not copies: frozen like it."""

    task: Literal["classification", "causal_lm"]
    model: ModelConfig
    data: DataConfig
    eval: EvalConfig
    precision: Literal["no", "bf16", "fp16"]  # the resolved one: it picks the attention kernel
    gradient_checkpointing: bool
    loss_chunk_tokens: int  # causal_lm: the lean loss's chunk
    class_weighting: Literal["none", "balanced"]  # classification

    @classmethod
    def of(cls, cfg: RunConfig) -> "TaskConfig":
        t = cfg.train
        return cls(cfg.task, cfg.model, cfg.data, cfg.eval, t.precision, t.gradient_checkpointing, t.loss_chunk_tokens,
                   t.class_weighting)


CLASSIFICATION_METRICS = ("macro_f1", "micro_f1", "loss", "accuracy")
CAUSAL_LM_METRICS = ("loss", "perplexity", "exact_match", "accuracy", "macro_f1", "choice_accuracy", "choice_macro_f1")
LOWER_IS_BETTER = {"loss", "perplexity"}


# ---------------------------------------------------------------- building


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin is list:
        return "list of " + _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", str(tp))


def _number(value: Any, tp: type, bad: ConfigError) -> Any:
    """An int or float from a number or its text (YAML 1.1 reads "3e-5" as a string); a bool,
    or a fraction where an int is expected, raises `bad`."""
    if isinstance(value, bool):
        raise bad
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) or (tp is float and isinstance(value, float)):
        return tp(value)
    if isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
        try:  # an int written as 5e4 (as 5.0e+4 already reads, through YAML's float)
            number = float(value)
        except ValueError:
            raise bad from None
        if tp is int and number.is_integer() and abs(number) < 2**63:
            return int(number)
        raise bad
    raise bad


def _coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML/override value to the annotated type, or say what was expected."""
    if tp is Any:  # checked by validate() instead (e.g. a list of names or one keyword)
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in allowed:
            return "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as false
        word = {"false": "no", "off": "no", "true": "yes", "on": "yes"}.get(value.lower()) if isinstance(value, str) else None
        if word in allowed:  # the same words as an override's text (`train.precision=off`), as a file reads them
            return word
        if value in allowed:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, allowed))}; got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = ([value] if value.strip() else []) if where in TEXT_LISTS else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list; got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    bad = ConfigError(f"{where}: expected {_type_name(tp)}; got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")  # (the words YAML reads as booleans unquoted)
        if type(value) is int and value in (0, 1):  # (YAML reads an unquoted 1 as a number)
            return bool(value)
        raise bad
    if tp in (int, float):
        return _number(value, tp, bad)
    if tp is str:
        if isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
            raise ConfigError(f"{where}: expected text; YAML read {{{next(iter(value))}}} as a mapping: quote the "
                              "template (e.g. prompt: \"Classify: {text}\")")
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    where = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key; {hint}")


def _build(cls, data: dict, prefix: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping; got {data!r}")
        return cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            problems.append(str(_unknown_key(str(key), names, prefix)))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.", problems)
            continue
        try:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
        except ConfigError as e:
            problems.extend(e.problems)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, cls=RunConfig, raw: str | None = None) -> None:
    """Place an override into the raw tree, checking the path against the dataclasses. A text
    field keeps the override's raw text when YAML read it as something else: data.prompt={text}
    is a template, not a mapping."""
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if part not in names:
            raise _unknown_key(part, names, prefix)
        tp = _hints(node_cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
            if raw is not None and raw.strip() not in NULLS and _is_text(tp, dotted) \
                    and not (dotted in TEXT_LISTS and isinstance(value, list)):
                value = _typed_text(raw, value)
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
        child = node.get(part)
        if child is not None and not isinstance(child, dict):
            return  # the file's own mistake, left for the build to report (it was overwritten unseen)
        if child is None:
            child = node[part] = {}
        node, node_cls = child, tp


NULLS = ("null", "Null", "NULL", "~")  # YAML's null words (an empty value is the empty text)

# Lists of free text: one string is one item (a prompt may hold commas); other lists of names
# or numbers also take "a,b" (data.label_names=fair,unfair).
TEXT_LISTS = ("eval.generation_prompts",)


def _is_text(tp, dotted: str) -> bool:
    """A field whose override is the text typed: a string, a choice of strings, a text list."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str or dotted in TEXT_LISTS


def _typed_text(raw: str, parsed: Any) -> Any:
    """An override of a text field as typed: YAML read `run_name=2024_01` as 202401, `12:30` as
    750, `1.10` as 1.1, `off` as False, cut `exp #3` at the comment and read `#3` as null. A
    quoted value keeps YAML's reading (its quotes removed); null words stay null (the caller)."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and isinstance(parsed, str):
        return parsed
    return text  # (stripped, as YAML did)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"{text}: overrides look like key=value (e.g. train.lr=3e-5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    output_dir: str | None = None,
    run_name: str | None = None,
    world_size: int = 1,
    check_files: bool = True,
    check_values: bool = True,
    absolute_data: bool = True,
) -> RunConfig:
    """Read YAML, apply overrides, build dataclasses, validate. Raises ConfigError.
    check_values=False (a config a run was written under, read back to compare): the fields and
    their types only, since the files it named may be gone and rules may have changed since.
    absolute_data=False: data paths as the file holds them (a config.yaml from before they were
    recorded absolute holds them relative to a directory it did not record)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    problems: list[str] = []
    for item in overrides:
        try:
            key, value = parse_override(item)
            _set_dotted(tree, key, value, raw=item.split("=", 1)[1])
        except ConfigError as e:
            problems.extend(e.problems)
    if output_dir is not None:
        tree["output_dir"] = output_dir
    if run_name is not None:
        tree["run_name"] = run_name
    _expand_home(tree)
    if absolute_data:
        _TYPED.clear()  # (this config's names only)
        _absolute_data(tree)
    _target_names(tree)
    explicit = frozenset(_dotted_keys(tree))
    if tree.get("run_name") is None:
        tree["run_name"] = Path(path).stem if path is not None else "run"
    cfg = with_explicit(_build(RunConfig, tree, "", problems), explicit)
    if check_values:
        problems.extend(validate(cfg, world_size=world_size, check_files=check_files))
    if problems:
        raise ConfigError(*problems)
    return cfg


# Paths a shell leaves with their `~` (`data.train_file=~/x` is no assignment to it), as
# model.name's is already read; expanded once here, so config.yaml records where they lead.
HOME_PATHS = ("output_dir", "data.train_file", "data.validation_file", "data.cache_dir", "checkpoint.resume")


def _expand_home(tree: dict) -> None:
    for dotted in HOME_PATHS:
        *sections, leaf = dotted.split(".")
        node: Any = tree
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf].startswith("~"):
            node[leaf] = os.path.expanduser(node[leaf])
    # a SQLite store given as sqlite:///~/m.db: a directory named ~ in the current one, before
    tracking = tree.get("tracking")
    if isinstance(tracking, dict) and isinstance(uri := tracking.get("uri"), str) and uri.startswith("sqlite:///~"):
        tracking["uri"] = "sqlite:///" + os.path.expanduser(uri[len("sqlite:///"):])


DATA_PATHS = ("train_file", "validation_file", "hub_dataset")


_TYPED: dict[str, str] = {}  # an absolute data path _absolute_data made -> the relative one it was given


def from_here(path) -> str:
    """What to add to "file not found" for a data path given relative (a shipped recipe's
    ../shared/...): it was read from the working directory, not the config's, and is absolute by now."""
    typed = _TYPED.get(str(path))
    return f" ({typed} read from the directory you start in, {os.getcwd()})" if typed else ""


def _absolute_data(tree: dict) -> None:
    """data.train_file / validation_file (and a local folder as data.hub_dataset) as absolute
    paths, so config.yaml records which files trained the run: as typed, a resume from another
    directory read other files under the same relative names, and one that named the same files
    otherwise was refused. (config_changes reads an older config.yaml's relative ones from here.)"""
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    for key in DATA_PATHS:
        value = data.get(key)
        if key == "hub_dataset" and isinstance(value, str) and os.path.isdir(os.path.expanduser(value)):
            value = os.path.expanduser(value)  # (a hub id stays an id)
        elif key == "hub_dataset":
            continue
        if isinstance(value, str) and value.strip() and not os.path.isabs(value):
            data[key] = os.path.abspath(value)
            _TYPED[data[key]] = value
        elif isinstance(value, str):
            data[key] = value


def _target_names(tree: dict) -> None:
    """model.lora.target_modules given as one name or `q_proj,v_proj` (as the other lists of
    names take them) is that list; "all-linear" stays the keyword. (A string reaching peft
    would be a regular expression matched against whole module paths: none matches q_proj.)"""
    model = tree.get("model")
    lora = model.get("lora") if isinstance(model, dict) else None
    if not isinstance(lora, dict):
        return
    tm = lora.get("target_modules")
    if isinstance(tm, str) and tm.strip() != "all-linear":
        lora["target_modules"] = [x.strip() for x in tm.split(",") if x.strip()] or tm


def with_explicit(cfg: RunConfig, keys: frozenset) -> RunConfig:
    """cfg, recording the dotted keys the user set. Per instance, not a field (it is not a
    setting): set past the frozen dataclass's guard, once, where the instance is made."""
    object.__setattr__(cfg, "explicit", keys)
    return cfg


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every key the YAML file or an override set, as dotted paths (sections and leaves)."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += _dotted_keys(value, path + ".")
    return out


# ---------------------------------------------------------------- validation


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping: PyYAML keeps the last, so a second
    `train:` section silently dropped the first one's settings. Checked on each mapping as
    written, before merge keys (`<<: *defaults`, which its own keys override) are folded in;
    PyYAML folds a mapping merged elsewhere in place, so each is checked once, at first sight."""

    def flatten_mapping(self, node):
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: set = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # (a list or mapping as a key: the SafeLoader says so in its own words)
                key = (key_node.tag, key_node.value)  # (the tag, resolved when composed: 1 and "1" differ)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"'{key_node.value}' appears twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
        super().flatten_mapping(node)


def tiny_learns_positions(cfg) -> bool:
    """Whether the tiny model learns a position table (BERT's, GPT-2's), sized from
    data.max_length; a Llama's rotary positions have none."""
    arch = cfg.model.tiny.arch
    return arch == "gpt2" or (cfg.task == "classification" and arch in ("auto", "bert"))


def validate(cfg: RunConfig, *, world_size: int = 1, check_files: bool = True) -> list[str]:
    """Every problem at once, each one line naming its field."""
    out: list[str] = []
    t, d, e, c = cfg.train, cfg.data, cfg.eval, cfg.checkpoint

    def positive(name: str, value, allow_zero=False):
        # (not `value <= 0`: NaN compares false to everything and passed; inf is no value either)
        if value is None:
            return
        finite = isinstance(value, int) or math.isfinite(value)  # (an int too large for a float is finite)
        if not (finite and (value > 0 or (value == 0 and allow_zero))):
            out.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}{'' if finite else ' and finite'}; got {value}")

    positive("train.epochs", t.epochs)
    positive("train.max_steps", t.max_steps)
    positive("train.lr", t.lr)
    positive("train.global_batch_size", t.global_batch_size)
    positive("train.micro_batch_size", t.micro_batch_size)
    positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    positive("train.weight_decay", t.weight_decay, allow_zero=True)
    positive("train.max_grad_norm", t.max_grad_norm)
    positive("train.halt_at_step", t.halt_at_step)
    positive("train.collective_timeout_s", t.collective_timeout_s)
    if t.collective_timeout_s > 10**9:  # (a timedelta overflowed on every rank, a traceback each)
        out.append(f"train.collective_timeout_s: at most 1000000000 (31 years); got {t.collective_timeout_s}")
    positive("data.max_length", d.max_length)
    positive("data.num_proc", d.num_proc)
    positive("train.loss_chunk_tokens", t.loss_chunk_tokens, allow_zero=True)
    positive("train.peak_tflops", t.peak_tflops)
    positive("data.num_workers", d.num_workers, allow_zero=True)
    positive("eval.every_steps", e.every_steps, allow_zero=True)
    positive("eval.early_stopping_patience", e.early_stopping_patience, allow_zero=True)
    positive("eval.micro_batch_size", e.micro_batch_size)
    positive("checkpoint.every_steps", c.every_steps, allow_zero=True)
    positive("checkpoint.keep_last", c.keep_last)
    positive("tracking.log_every_steps", cfg.tracking.log_every_steps)
    positive("tracking.flush_every_steps", cfg.tracking.flush_every_steps)
    positive("tracking.outage_wait_s", cfg.tracking.outage_wait_s, allow_zero=True)
    positive("tracking.system_metrics_every_s", cfg.tracking.system_metrics_every_s, allow_zero=True)
    if cfg.tracking.register_model is not None and not (cfg.tracking.mlflow and cfg.tracking.log_model):
        out.append("tracking.register_model: needs tracking.mlflow and tracking.log_model true")
    positive("tracking.print_every_s", cfg.tracking.print_every_s, allow_zero=True)
    positive("train.hang_timeout_s", t.hang_timeout_s, allow_zero=True)
    positive("model.tiny.vocab_size", cfg.model.tiny.vocab_size)
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        positive(f"model.tiny.{name}", getattr(cfg.model.tiny, name))
    if not 0.0 <= cfg.model.tiny.dropout < 1.0:
        out.append(f"model.tiny.dropout: must be in [0, 1); got {cfg.model.tiny.dropout}")
    for name, seed in (("train.seed", t.seed), ("data.synthetic.seed", d.synthetic.seed)):
        if not 0 <= seed < 2**32:  # what numpy's and accelerate's set_seed take
            out.append(f"{name}: must be in [0, 2**32); got {seed}")
    if not 0.0 <= t.warmup_ratio < 1.0:  # (NaN fails this too)
        out.append(f"train.warmup_ratio: must be in [0, 1); got {t.warmup_ratio}")
    if t.micro_batch_size > 0 and t.global_batch_size > 0:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            fits = [m for m in range(t.micro_batch_size, 0, -1) if t.global_batch_size % (m * world_size) == 0][:3]
            hint = (f"; train.micro_batch_size {' or '.join(map(str, fits))} would divide it" if fits else
                    f"; no micro-batch size does on {world_size} ranks: use a number of ranks that divides it")
            out.append(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                f"train.micro_batch_size ({t.micro_batch_size}) x world size ({world_size}) = {per_step}{hint}"
            )
    if cfg.model.tiny.hidden_size % max(cfg.model.tiny.num_heads, 1):
        out.append("model.tiny.hidden_size: must be divisible by model.tiny.num_heads")
    metrics = CAUSAL_LM_METRICS if cfg.task == "causal_lm" else CLASSIFICATION_METRICS
    if cfg.eval_metric not in metrics:
        close = difflib.get_close_matches(cfg.eval_metric, metrics, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "one of " + ", ".join(metrics)
        out.append(f"eval.metric: unknown metric '{cfg.eval_metric}' for task {cfg.task}; {hint}")
    positive("eval.max_new_tokens", e.max_new_tokens)
    arch = cfg.model.tiny.arch
    if arch != "auto" and (arch == "bert") != (cfg.task == "classification"):
        out.append(f"model.tiny.arch: {arch} does not fit task {cfg.task} (bert: classification; llama, gpt2: causal_lm)")
    absolute = tiny_learns_positions(cfg)
    if cfg.model.name == TINY_MODEL and absolute and d.max_length > TINY_POSITIONS:
        # (the tiny BERT and GPT-2 learn one position vector per token of data.max_length:
        # 100 million tokens asked for a 25.6 GB table and died in torch's allocator)
        out.append(f"data.max_length: at most {TINY_POSITIONS} for the tiny {'gpt2' if arch == 'gpt2' else 'bert'} "
                   f"model, which learns a position table that long; got {d.max_length}")
    elif cfg.model.name == TINY_MODEL and arch == "gpt2" and e.max_new_tokens > TINY_POSITIONS:
        # (its table also holds the evaluation's answers: data.max_length + eval.max_new_tokens + 64)
        out.append(f"eval.max_new_tokens: at most {TINY_POSITIONS} for the tiny gpt2 model, whose position table "
                   f"holds the answers too; got {e.max_new_tokens}")
    lora = cfg.model.lora
    if lora.enabled:
        positive("model.lora.r", lora.r)
        positive("model.lora.alpha", lora.alpha)
        if not 0.0 <= lora.dropout < 1.0:
            out.append(f"model.lora.dropout: must be in [0, 1); got {lora.dropout}")
        tm = lora.target_modules
        if not (tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
            out.append(f"model.lora.target_modules: a list of module names or \"all-linear\"; got {tm!r}")
        layers = lora.layers_to_transform
        if layers is not None and (not layers or min(layers) < 0):
            out.append(f"model.lora.layers_to_transform: a non-empty list of block numbers from 0; got {layers!r}")
    if cfg.task == "causal_lm":
        from launcher.data.prompts import fixed_template_problems, template_problems

        out += fixed_template_problems("data.prompt_template", d.prompt_template, ("instruction", "input"))
        # {input} renders empty there: one string may serve both keys
        out += fixed_template_problems("data.prompt_template_no_input", d.prompt_template_no_input, ("instruction",), ("input",))
        turn = fixed_template_problems("data.chat_turn_template", d.chat_turn_template, ("role", "content"))
        if not turn and d.chat_turn_template.count("{content}") != 1:  # render splits the turn there
            turn = ["data.chat_turn_template: must contain {content} once, as written (no conversion or format spec)"]
        out += turn
        out += template_problems("data.prompt", d.prompt) + template_problems("data.response", d.response)
        if (d.prompt is None) != (d.response is None):
            missing = "data.response" if d.response is None else "data.prompt"
            out.append(f"{missing}: required with {'data.prompt' if missing == 'data.response' else 'data.response'} "
                       "(both map columns, e.g. data.prompt='{text}' data.response='{label}')")
        if e.generate_rows == 0 and cfg.eval_metric not in ("loss", "perplexity"):
            out.append(f"eval.metric: {cfg.eval_metric} scores generated answers, but eval.generate_rows is 0")
        positive("eval.generate_rows", e.generate_rows, allow_zero=True)
        positive("data.max_rows_per_answer", d.max_rows_per_answer)
    elif d.packing:
        out.append("data.packing: only for task causal_lm")
    if cfg.task != "causal_lm":
        for key in ("prompt", "response", "system_prompt", "max_rows_per_answer"):
            if getattr(d, key) is not None:
                out.append(f"data.{key}: only for task causal_lm")
    q = cfg.model.quantization
    if q != "none":
        if cfg.task != "causal_lm":
            out.append(f"model.quantization: {q} is for task causal_lm")
        elif not lora.enabled:
            out.append(f"model.quantization: {q} trains LoRA adapters on a frozen quantized base: set model.lora.enabled=true")
        elif cfg.model.name == TINY_MODEL:
            out.append(f"model.quantization: {q} loads pretrained weights (model.name: a directory, GGUF or hub name), "
                       "not the tiny random model")
        elif q == "int8" and lora.use_dora:  # seen: bitsandbytes 0.50's int8 matmul fails inside DoRA's forward
            out.append("model.lora.use_dora: not with model.quantization=int8 (bitsandbytes' 8-bit layers fail under "
                       "DoRA); use nf4")
    if cfg.model.pooling != "cls" and cfg.task != "classification":
        out.append(f"model.pooling: {cfg.model.pooling} is for task classification")
    if e.tune_threshold and cfg.task != "classification":
        out.append("eval.tune_threshold: only for task classification")
    if e.metric == "accuracy" and d.mode == "multilabel" and cfg.task == "classification":
        out.append("eval.metric: accuracy is reported for one class per row (data.mode binary or multiclass)")
    if d.mode == "multiclass" and cfg.task == "classification":
        if not d.label_names or len(d.label_names) < 2:
            out.append("data.label_names: data.mode=multiclass needs the class names, 2 or more (e.g. "
                       "[negative, neutral, positive]); a row's label is a name or an id")
        if e.tune_threshold:
            out.append("eval.tune_threshold: binary and multilabel only (multiclass takes the likeliest class)")
        if d.synthetic.enabled or (d.train_file is None and d.hub_dataset == DataConfig.hub_dataset
                                   and d.hub_config == DataConfig.hub_config):  # (LexGLUE's LEDGAR is one)
            out.append("data.mode: multiclass needs data of its own (data.train_file, or data.hub_dataset=ID): "
                       "the UNFAIR-ToS clauses are binary or multilabel")
    if cfg.task != "classification" and (d.text_column != "text" or d.label_column is not None):
        out.append("data.text_column / data.label_column: for task classification (a causal LM maps its columns "
                   "with data.prompt and data.response)")
    if not d.text_column.strip() or (d.label_column is not None and not d.label_column.strip()):
        out.append("data.text_column / data.label_column: a column name is empty")
    elif d.text_column == d.label_column:
        out.append(f"data.label_column: {d.label_column!r} is data.text_column too")
    if d.label_names is not None:
        if d.mode == "binary" and len(d.label_names) != 2:
            out.append(f"data.label_names: binary mode needs 2 names (negative, positive); got {len(d.label_names)} "
                       "(data.mode=multiclass for one of several classes per row)")
        folded = [n.strip().lower() for n in d.label_names]  # as rows are matched to them
        if len(set(folded)) != len(folded):
            out.append("data.label_names: names must be unique (case and spaces aside: rows match them so)")
        if any(not n for n in folded):
            out.append("data.label_names: a name is empty")
        if d.mode == "multilabel" and "none" in folded:  # its f1/none would be overwritten
            out.append("data.label_names: 'none' is the name of multilabel's column for clauses with no category "
                       "(f1/none); call the category something else")
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        out.append(f"run_name: must be a plain directory name; got {cfg.run_name!r}")
    if not cfg.output_dir.strip():  # the run, mlflow.db and the cache went into the current directory
        out.append("output_dir: empty; give a directory (default: runs), or . for this one")
    if cfg.tracking.mlflow and not cfg.tracking.uri and (odd := sorted(set("?%") & set(str(Path(cfg.output_dir).resolve())))):
        # MLflow and SQLAlchemy read the store's sqlite:/// URI as a URL: a query from `?` on (the
        # store was the file before it, outside the directory), `%` as an escape; escaped, MLflow
        # makes an empty directory of the escaped name beside it.
        out.append(f"output_dir: {cfg.output_dir} holds {' '.join(repr(c) for c in odd)}, which the default MLflow "
                   "store's sqlite:/// URI cannot carry; choose another --output-dir, or set tracking.uri "
                   "(or tracking.mlflow=false)")
    if not cfg.model.name.strip():
        out.append("model.name: empty; give a model directory, a GGUF file, a hub name or tiny")
    if t.max_steps is not None and t.halt_at_step is not None and t.halt_at_step > t.max_steps:
        out.append(f"train.halt_at_step: {t.halt_at_step} is past train.max_steps ({t.max_steps}): the run would "
                   "finish first")
    if check_files and (probe := file_in_the_way(Path(cfg.output_dir) / str(cfg.run_name))):
        out.append(f"output_dir: {probe} is a file, not a directory (choose another --output-dir)")
    if c.resume not in ("auto", "never") and check_files and not Path(c.resume).is_dir() \
            and owner.started_from(cfg.run_dir, c.resume) is None:  # a requeue: its source may be gone
        out.append(f"checkpoint.resume: {c.resume}: no such checkpoint directory (or use auto | never)")
    if (cfg.task == "causal_lm" and not d.synthetic.enabled and d.train_file is None
            and d.hub_dataset == DataConfig.hub_dataset):
        out.append("data.train_file: no instruction data given; pass data.train_file=train.jsonl "
                   "data.validation_file=validation.jsonl (rows: instruction/output, messages, prompt/completion, "
                   "conversations, or any columns with data.prompt / data.response), or data.hub_dataset=ID")
    if d.synthetic.enabled:
        positive("data.synthetic.n_train", d.synthetic.n_train)
        positive("data.synthetic.n_validation", d.synthetic.n_validation)
        if 0 < d.synthetic.n_train < t.global_batch_size:
            out.append(f"data.synthetic.n_train: {d.synthetic.n_train} rows is fewer than train.global_batch_size "
                       f"({t.global_batch_size})")
        if d.train_file or d.validation_file:
            out.append("data.synthetic.enabled: set data.train_file/validation_file to null, or disable synthetic data")
        if cfg.task == "classification" and (d.text_column != "text" or d.label_column not in (None, "labels")):
            # (it failed once the run directory existed, at the generated file's columns)
            out.append("data.text_column / data.label_column: name columns of your own data; synthetic clauses "
                       "(data.synthetic.enabled) have text and labels")
    elif d.train_file or d.validation_file:
        for key in ("train_file", "validation_file"):
            value = getattr(d, key)
            if value is None:
                out.append(f"data.{key}: required when data.{'validation_file' if key == 'train_file' else 'train_file'} is set")
            elif check_files and Path(value).is_dir():
                if not ((Path(value) / "state.json").is_file() or (Path(value) / "dataset_dict.json").is_file()):
                    out.append(f"data.{key}: {value}: a directory, but not one written by Dataset.save_to_disk "
                               "(for a folder of data files use data.hub_dataset=DIR)")
            elif check_files and not Path(value).is_file():
                out.append(f"data.{key}: {value}: file not found" + from_here(value))
            elif not str(value).lower().endswith((".jsonl", ".json", ".csv", ".parquet")) and not Path(value).is_dir():
                out.append(f"data.{key}: {value}: unsupported format (use .jsonl, .csv, .parquet or a save_to_disk directory)")
    name = cfg.model.name
    if check_files and name != TINY_MODEL and name.lower().endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            out.append(f"model.name: {name}: no such GGUF file")
    elif check_files and name != TINY_MODEL and name.startswith(("/", "./", "../", "~")):
        if not Path(name).expanduser().is_dir():
            out.append(f"model.name: {name}: no such model directory")
    return out


# ---------------------------------------------------------------- output


def to_dict(cfg) -> dict:
    """The config as plain data, as it is written and logged: a password in tracking.uri
    is replaced by *** (config.yaml, MLflow params and printed lines never carry it)."""
    tree = dataclasses.asdict(cfg)
    if isinstance(tree.get("tracking"), dict) and tree["tracking"].get("uri"):
        tree["tracking"]["uri"] = redact_uri(tree["tracking"]["uri"])
    return tree


# Query parameters that carry credentials in store and server URIs (a SQLAlchemy
# `?password=`, a signed URL's `?sig=`, a gateway's `?token=` or `?api_key=`).
SECRET_QUERY_KEYS = ("token", "key", "secret", "password", "passwd", "pwd", "auth", "sig", "signature", "credential")


def redact_uri(uri: str) -> str:
    """scheme://user:secret@host/...?token=secret -> scheme://user:***@host/...?token=***
    (the password, and every query value whose name says it is a credential; anything else
    unchanged)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is not None:  # a netloc: urlunsplit gives the URI back as written
        host = parts.netloc.rsplit("@", 1)[1]
        uri = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    if parts.query:  # rewritten in place: urlunsplit would turn sqlite:///a.db into sqlite:/a.db
        fields = []
        for field in parts.query.split("&"):
            name, eq, value = field.partition("=")
            secret = eq and value and any(k in name.lower() for k in SECRET_QUERY_KEYS)
            fields.append(f"{name}=***" if secret else field)
        uri = uri.replace(f"?{parts.query}", "?" + "&".join(fields), 1)
    return uri


def redact_text(text: str, uri: str) -> str:
    """`text` (an exception message, a log line) with every secret of `uri` replaced, wherever
    and however the URI appears in it: as written or percent-decoded (libraries print either).
    Values under 4 characters are replaced only inside the URI itself (`?auth=1` would
    otherwise turn every "1" of the text into ***)."""
    from urllib.parse import unquote, urlsplit

    text = text.replace(uri, redact_uri(uri)).replace(unquote(uri), redact_uri(uri))
    try:
        parts = urlsplit(uri)
    except ValueError:
        return text
    secrets = [parts.password] if parts.password else []
    for field in parts.query.split("&") if parts.query else []:
        name, _, value = field.partition("=")
        if value and any(k in name.lower() for k in SECRET_QUERY_KEYS):
            secrets.append(value)
    found = {v for s in secrets for v in (s, unquote(s)) if len(v) >= 4}
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def unused_lora(lora: LoraConfig) -> list[str]:
    """The model.lora settings given other than their defaults while model.lora.enabled is
    false: unused, since every weight trains (a run meant as LoRA trained in full without a word)."""
    if lora.enabled:
        return []
    default = LoraConfig()
    return [f.name for f in dataclasses.fields(lora) if f.name != "enabled" and getattr(lora, f.name) != getattr(default, f.name)]


def field_docs(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, default) rows: the README's config reference is checked against them
    (tests/test_readme.py)."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((prefix + f.name, _type_name(tp), repr(default)))
    return rows
