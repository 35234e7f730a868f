"""Task adapters: what the one training loop asks of a workload.

Each task object offers: check_model_source, random_init, sources (where each split's rows
come from), write_synthetic, tokenizer, datasets (memory-mapped token rows), describe, build_model, collator, prepare, loss, evaluate,
tune (a decision rule fitted on validation before export; None when off),
samples (generations; [] when the task has none), metadata (launcher.json), and for
`launcher plan` count_parameters and count_rows (no weights loaded, no process group;
plan asks launcher.sizing first, which needs neither torch nor transformers).
"""

from __future__ import annotations


def for_config(cfg):
    if cfg.task == "causal_lm":
        from launcher.tasks.causal_lm import CausalLMTask

        return CausalLMTask(cfg)
    from launcher.tasks.classification import ClassificationTask

    return ClassificationTask(cfg)
