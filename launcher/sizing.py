"""Model size and shape for `launcher plan`, from config.json arithmetic: no torch, no
transformers, so planning and validation stay well under a second.

The families the launcher builds or is most often pointed at are counted here (BERT-style
encoders with a classification head, Llama-style and GPT-2 decoders). Anything else
returns None and `plan` falls back to building the model on the meta device, which is
exact for every architecture but imports torch and transformers (seconds). A test
checks these formulas against that meta-device count for every family listed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from launcher.config import TINY_MODEL, DataConfig, RunConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2")


def human_bytes(n_bytes: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def checkpoint_bytes(n_saved: int, n_trainable: int, width: int) -> int:
    """About what one checkpoint takes: the saved weights at their width (all of them, or
    only the trainable ones for LoRA on a pretrained base), AdamW's two fp32 moments per
    trainable weight, and an fp32 master copy of those when the weights are 16-bit (DeepSpeed
    keeps one). Tokenizer, config and RNG files are small beside these."""
    return int(n_saved * width + n_trainable * (8 + (4 if width < 4 else 0)))


def tiny_config(cfg: RunConfig) -> dict:
    """The config.json the tiny random model gets (vocabulary at its upper bound)."""
    t = cfg.model.tiny
    if cfg.task == "classification":
        return {"model_type": "bert", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
                "intermediate_size": t.intermediate_size, "max_position_embeddings": max(cfg.data.max_length, 16),
                "type_vocab_size": 2}
    positions = max(cfg.data.max_length, 16) + cfg.eval.max_new_tokens + 64  # as causal_lm.tiny_config
    if t.arch == "gpt2":
        return {"model_type": "gpt2", "vocab_size": t.vocab_size, "n_embd": t.hidden_size, "n_layer": t.num_layers,
                "n_head": t.num_heads, "n_inner": t.intermediate_size, "n_positions": positions}
    return {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_heads,
            "intermediate_size": t.intermediate_size, "tie_word_embeddings": False}


def count(config: dict, task: str, num_labels: int, pooling: str = "cls") -> int | None:
    """Parameters of the model the launcher builds from this config (the task's head
    included, tied embeddings counted once; mean pooling replaces BERT's pooler with none);
    None for a family not modelled here."""
    kind = config.get("model_type")
    if task == "classification" and kind == "bert":
        h, inter, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        embeddings = (config["vocab_size"] + config.get("max_position_embeddings", 512)
                      + config.get("type_vocab_size", 2)) * h + 2 * h
        layer = 4 * h * h + 2 * h * inter + 9 * h + inter  # q k v o, two MLP matrices, biases, 2 LayerNorms
        pooler = h * h + h if pooling == "cls" else 0
        return embeddings + n * layer + pooler + (h * num_labels + num_labels)  # pooler, classifier
    if task == "causal_lm" and kind in LLAMA_LIKE:
        h, inter, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or h // heads
        bias = bool(config.get("attention_bias", kind == "qwen2"))
        attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
        if bias:  # q, k, v biases (Qwen2 has no o bias; Llama's flag also adds one to o)
            attn += heads * head_dim + 2 * kv * head_dim + (h if kind != "qwen2" else 0)
        mlp = 3 * h * inter + (2 * inter + h if config.get("mlp_bias") else 0)
        vocab = config["vocab_size"] * h
        tied = config.get("tie_word_embeddings", False)  # the default of all three config classes
        return vocab * (1 if tied else 2) + n * (attn + mlp + 2 * h) + h
    if task == "causal_lm" and kind == "gpt2":
        h, n = config["n_embd"], config["n_layer"]
        inter = config.get("n_inner") or 4 * h
        layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)
        return (config["vocab_size"] + config.get("n_positions", 1024)) * h + n * layer + 2 * h
    return None


def _saved_config(name: str) -> dict | None:
    path = Path(name) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def model_facts(cfg: RunConfig) -> tuple[int, str, SimpleNamespace] | None:
    """(parameters, where the figure came from, the config as attributes) for the tiny model
    or a local pretrained directory of a counted family; None otherwise."""
    num_labels = len(cfg.data.resolved_label_names())
    config: dict | None
    if cfg.model.name == TINY_MODEL:
        config = tiny_config(cfg)
        arch = "BERT" if cfg.task == "classification" else cfg.model.tiny.arch
        where = f"tiny {arch}, vocabulary at most {cfg.model.tiny.vocab_size}"  # as the tasks' own count
    else:
        config = _saved_config(cfg.model.name)
        where = f"config of {cfg.model.name}"
    if not config:
        return None
    n = count(config, cfg.task, num_labels, cfg.model.pooling)
    return None if n is None else (n, where, SimpleNamespace(**config))


def count_rows(task: str, d: DataConfig) -> tuple[int | None, str]:
    """(training rows, where from) for the step arithmetic; (None, why) when unknown before
    the run starts (hub data, packed blocks). Cheap where the format allows (JSONL lines,
    Parquet metadata); other files are read by the task's own reader. A file training would
    refuse raises its DataError."""
    from launcher.data import sources
    from launcher.errors import DataError, UserError

    n: int | None
    if d.synthetic.enabled:
        n, where = d.synthetic.n_train, "synthetic"
    elif d.train_file is None:
        if Path(d.hub_dataset).expanduser().is_dir():
            return None, f"rows of {sources.resolve(d, 'train')} (a local folder) are counted when the run starts"
        hub = f"{d.hub_dataset}/{d.hub_config}" if task == "classification" else d.hub_dataset
        return None, f"rows of {hub} (hub) are counted when the run starts"
    else:
        try:
            n = sources.resolve(d, "train").count_rows()
            if n is None and task == "classification":
                from launcher.data.clauses import load_split

                n = len(load_split(d, "train", d.train_file)[0])
            elif n is None:
                from launcher.data.instructions import read_rows
                from launcher.data.prompts import PromptFormat

                n = len(read_rows(d.train_file, PromptFormat.from_config(d, None)))  # (data.prompt maps its columns)
        except UserError as e:  # what training would refuse: plan refuses it too
            raise DataError(*e.problems) from None
        where = d.train_file
    if task == "causal_lm" and d.packing:  # optimizer steps count blocks, known once rows are packed
        return None, f"{n:,} {where} rows are packed into {d.max_length}-token blocks when the run starts"
    if task == "causal_lm" and d.truncation == "drop":  # rows past max_length are known once tokenized
        return None, (f"{n:,} {where} rows, less those longer than {d.max_length} tokens (data.truncation=drop): "
                      "counted when the run starts")
    if task == "causal_lm" and d.max_rows_per_answer:
        return None, (f"{n:,} {where} rows, at most {d.max_rows_per_answer} per answer (data.max_rows_per_answer): "
                      "counted when the run starts")
    return n, where
