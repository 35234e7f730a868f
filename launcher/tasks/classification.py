"""Clause classification: tokenizer + model, loss, LexGLUE-style metrics, export metadata.

Binary mode is single-label softmax over (negative, positive), multiclass over the
data.label_names (the likeliest class is the prediction). Multilabel mode has one
sigmoid per category; a clause with no category is "fair". Metrics follow LexGLUE for
UNFAIR-ToS: predictions are sigmoid > 0.5, and an extra "none" column (1 when a row
has no category) joins both truth and prediction before micro/macro-F1, so fair
clauses count (where rows have no category: data whose every row has one go without).

The decision rule: by default a clause is positive when the positive class's
probability is above 0.5 (binary; the same as argmax) or a category's sigmoid is
above 0.5 (multilabel). With eval.tune_threshold the cut(s) are tuned on validation
after training (tune_cuts) and stored in model/launcher.json as "threshold" (a number
for binary, {category: cut} for multilabel); eval and predict then use them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.config import TINY_MODEL, TaskConfig
from launcher.data.tokenizer import settings_kept
from launcher.errors import ConfigError, DataError
from launcher import models
from launcher.models import from_pretrained, inference_device, pad_with_eos, position_limit, remote_code_gate
from launcher.tasks import pooling

THRESHOLD = 0.5


# ---------------------------------------------------------------- model


def check_model_source(cfg: TaskConfig) -> None:
    """Fail early (ConfigError) when model.name is neither "tiny", a model directory, nor reachable."""
    if cfg.model.name != TINY_MODEL:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

        config = from_pretrained(AutoConfig, cfg.model.name, cfg.model)
        if moved := _reordered_head(config, cfg.data.resolved_label_names(), cfg.model.name):
            raise ConfigError(moved)
        if cfg.model.pooling != "mean" and pooling.saved(config) == "mean":
            # Its head learned means, and its export holds no [CLS] pooler: going on by the
            # model's record while the run's config said cls was the silent alternative.
            raise ConfigError(f"model.pooling: {cfg.model.name} was trained on the mean of each text's tokens (its "
                              f"config.json records {pooling.CONFIG_KEY}: mean); set model.pooling=mean to go on with it")
        if cfg.model.pooling == "mean" and type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
            # A model with neither a [CLS] pooler nor a decoder's head is one line here, before
            # the run starts. The class is built directly on the meta device: from_config would,
            # under ZeRO-3, initialise it inside deepspeed.zero.Init with collectives (each rank
            # checks alone). transformers' generic decoder classifiers (Llama and kin) build their
            # body with from_config themselves, which under ZeRO-3 initialises meta weights and
            # fails: they are decoders by their class. Remote-code classes are checked when built.
            from transformers.modeling_layers import GenericForSequenceClassification

            model_class: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
            if not issubclass(model_class, GenericForSequenceClassification):
                with torch.device("meta"):
                    model = model_class(config)
                pooling.check(model, cfg.model.name)


def _reordered_head(config, names: list[str], model_name: str) -> str:
    """A trained classifier's head is kept when the run has as many classes (a new one is
    made only for another count), under the run's names: one of its classes at another id
    here trained from swapped classes without a word. One line naming it, or ""."""
    import re

    try:
        theirs = {int(i): str(n).strip().lower() for i, n in (getattr(config, "id2label", None) or {}).items()}
    except (TypeError, ValueError):  # (ids that are no numbers: a remote-code config of its own)
        return ""
    if len(theirs) != len(names) or len(set(theirs.values())) < len(theirs) \
            or all(re.fullmatch(r"label_\d+", n) for n in theirs.values()):
        return ""  # (a new head, one with transformers' placeholder names, or names that tell no order)
    for i, name in enumerate(n.strip().lower() for n in names):
        for j, their in sorted(theirs.items()):
            if their == name and i != j:
                order = ", ".join(str(config.id2label[k]) for k in sorted(config.id2label, key=int))  # (ints above)
                return (f"data.label_names: {names[i]!r} is class {i} here but class {j} of the trained head of "
                        f"{model_name} ({order}); give data.label_names in the model's order")
    return ""


def load_tokenizer(cfg: TaskConfig, saved_dir: Path, train_source, cache):
    """The run's tokenizer. A tiny model's is trained on the training texts (once per data
    cache) and kept in the run directory, so a resumed run tokenizes exactly as the first one did."""
    from transformers import AutoTokenizer

    from launcher.data import pipeline

    if cfg.model.name != TINY_MODEL:
        return from_pretrained(AutoTokenizer, cfg.model.name, cfg.model)
    if (saved_dir / "tokenizer.json").is_file():
        return pipeline.saved_tokenizer(saved_dir)
    from launcher.data.tokenizer import train_wordpiece

    column = cfg.data.text_column

    def train(source):
        from launcher.data.clauses import column_problems

        rows = list(pipeline.first_rows(source, cache))
        columns = list(dict.fromkeys(k for r in rows for k in r))  # (a row may lack one: the rows' check says so)
        if rows and (missing := column_problems(columns, str(source), column, cfg.data.label_column)):
            raise DataError(*missing)  # (as the rows' check says it, before a tokenizer is trained on nothing)
        texts = [r[column] for r in rows if isinstance(r.get(column), str)]
        if not any(t.strip() for t in texts):  # (a vocabulary of special tokens alone read every text as [UNK])
            raise DataError(f"{source}: no '{column}' (data.text_column) text in its first rows to train the tiny "
                            "model's tokenizer on")
        return train_wordpiece(texts, cfg.model.tiny.vocab_size, cfg.data.max_length)

    # The column is in the key: another column's texts (or none, from a misspelt one) trained a
    # vocabulary that a later run with the corrected column reused from the cache.
    key = {"kind": "wordpiece", "vocab_size": cfg.model.tiny.vocab_size, "max_length": cfg.data.max_length,
           "column": column}
    return pipeline.tokenizer_from_cache(train_source, cache, key, train)


def random_init(cfg: TaskConfig) -> bool:
    """True when the model starts from random weights rather than a pretrained checkpoint."""
    return cfg.model.name == TINY_MODEL


def label_maps(label_names: list[str]) -> dict:
    return {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}


def _problem_type(cfg: TaskConfig) -> str:
    return "multi_label_classification" if cfg.data.mode == "multilabel" else "single_label_classification"


def tiny_config(cfg: TaskConfig, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig

    t, names = cfg.model.tiny, cfg.data.resolved_label_names()
    heads: dict = {"num_labels": len(names), "problem_type": _problem_type(cfg), **label_maps(names)}  # PretrainedConfig's
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=max(cfg.data.max_length, 16),
        hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout,
        pad_token_id=pad_token_id,
        **heads,
    )
    pooling.record(config, cfg.model.pooling)  # models.from_config builds it that way
    return config


def count_parameters(cfg: TaskConfig) -> tuple[int | None, str, object]:
    """(parameter count, where it came from, the model config) without loading weights: the
    model is built on the meta device from its config. None (and no config) when the config
    cannot be read offline."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    names = cfg.data.resolved_label_names()
    if cfg.model.name == TINY_MODEL:
        config = tiny_config(cfg, cfg.model.tiny.vocab_size, 0)
        source = f"tiny BERT, vocabulary at most {cfg.model.tiny.vocab_size}"
    else:
        try:
            config = from_pretrained(AutoConfig, cfg.model.name, cfg.model, num_labels=len(names))
        except ConfigError as e:
            return None, e.problems[0], None
        source = f"config of {cfg.model.name}"
    with torch.device("meta"):
        model = models.from_config(AutoModelForSequenceClassification, config)
    return sum(p.numel() for p in model.parameters()), source, config


def build_model(cfg: TaskConfig, tokenizer, dtype: str = "float32"):
    from transformers import AutoModelForSequenceClassification

    from launcher.tasks.modeling import attn_for, torch_dtype

    names = cfg.data.resolved_label_names()
    attn = attn_for(cfg, AutoModelForSequenceClassification)
    if cfg.model.name == TINY_MODEL:
        return models.from_config(AutoModelForSequenceClassification,
                                  tiny_config(cfg, len(tokenizer), tokenizer.pad_token_id), attn_implementation=attn)
    problem = _problem_type(cfg)
    model = from_pretrained(
        AutoModelForSequenceClassification,
        cfg.model.name,
        cfg.model,
        attn_implementation=attn,
        dtype=torch_dtype(dtype),
        num_labels=len(names),
        problem_type=problem,
        ignore_mismatched_sizes=True,  # a pretrained head with another label count is replaced
        output_loading_info=True,  # which weights are new: LoRA trains them whole (lora.apply)
        **label_maps(names),
    )
    if tokenizer.pad_token_id is not None:  # the id batches are padded with: a decoder's head skips it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def is_multilabel(model_config) -> bool:
    return getattr(model_config, "problem_type", None) == "multi_label_classification"


# ---------------------------------------------------------------- loss


def class_weights(targets: torch.Tensor, multilabel: bool, classes: int = 2) -> torch.Tensor:
    """Balanced weights from training label frequencies (scikit-learn's "balanced").

    binary and multiclass: CE weight n / (k * n_c) per class of k; multilabel: BCE pos_weight =
    n_neg / n_pos per category (a category or class never seen keeps weight 1).
    """
    if multilabel:
        pos = targets.sum(0)
        neg = targets.shape[0] - pos
        return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))
    counts = torch.bincount(targets, minlength=classes).float()
    return torch.where(counts > 0, targets.numel() / (len(counts) * counts.clamp(min=1)), torch.ones_like(counts))


def unseen_notes(seen, scored, names: list[str]) -> list[str]:
    """Notes naming the categories (classes) no training row has, which the model cannot learn,
    and those no validation row has, which score F1 0 at every evaluation: either F1 of 0 counts
    in every macro-F1 the run reports (a subset of the data, a label id off by one). seen,
    scored: rows per category or class in training and validation (TokenRows.column_sums)."""
    notes = []
    unseen = [f"{name!r} ({scored[i]} validation rows)" for i, name in enumerate(names) if seen[i] == 0]
    if unseen:
        notes.append(f"note: no training row has {', '.join(unseen)}: the model cannot learn "
                     f"{'them' if len(unseen) > 1 else 'it'}, and an F1 of 0 for each counts in the macro-F1")
    unscored = [repr(name) for i, name in enumerate(names) if scored[i] == 0 and seen[i] > 0]
    if unscored:
        notes.append(f"note: no validation row has {', '.join(unscored)}: an F1 of 0 for each at every evaluation "
                     "counts in the macro-F1")
    return notes


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if labels.dtype.is_floating_point:  # multilabel
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=weights, reduction="none")
        return loss.mean(-1)
    return torch.nn.functional.cross_entropy(logits, labels, weight=weights, reduction="none")


def mean_loss(per_example: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> float:
    """The training objective's mean of per_example_loss, the one evaluation loss (the run's
    and `launcher eval`'s): with class weights on single-label classes, the weighted mean
    (torch's definition: sum of w_y * loss over sum of w_y, what a step divides by, loss_items);
    otherwise the mean over examples (multi-label pos_weight is inside each example's loss)."""
    if weights is not None and not labels.dtype.is_floating_point:
        return float(per_example.double().sum() / weights.double()[labels].sum())
    return float(per_example.double().mean())


# ---------------------------------------------------------------- metrics


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, -1)


def _f1(tp, fp, fn) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def checked_threshold(threshold, label_names: list[str], multilabel: bool, path: Path):
    """launcher.json's "threshold" as read, when it is a rule this model can apply: a cut
    strictly between 0 and 1, or for a multi-label model {category: cut} over its own
    categories. Anything else is one line naming the file (a cut of 0 or 1 decided every
    row alike, an unknown category's cut was ignored, a per-category rule on a binary model
    was a traceback)."""
    def cut(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1

    where = f"MODEL_DIR: {path}: threshold"
    if not multilabel and len(label_names) > 2 and threshold not in (None, THRESHOLD):  # (argmax: it was ignored)
        raise ConfigError(f"{where}: a cut is for a binary or multi-label model; this one picks the likeliest of "
                          f"{len(label_names)} classes")
    if threshold is None or cut(threshold):
        return threshold
    if not isinstance(threshold, dict):
        raise ConfigError(f"{where}: {json.dumps(threshold)} is not a cut strictly between 0 and 1")
    if not multilabel:
        raise ConfigError(f"{where}: a cut per category is for a multi-label model; this one is binary (one number)")
    unknown = sorted(set(threshold) - set(label_names))
    if unknown:
        raise ConfigError(f"{where}: {', '.join(map(repr, unknown))} not among the model's categories "
                          f"({', '.join(label_names)})")
    wrong = [k for k, v in threshold.items() if not cut(v)]
    if wrong:
        raise ConfigError(f"{where}: {wrong[0]!r}: {json.dumps(threshold[wrong[0]])} is not a cut strictly between 0 and 1")
    return threshold


def cut_vector(threshold, label_names: list[str], multilabel: bool) -> np.ndarray:
    """launcher.json's "threshold" (a number, or {category: cut}) as one cut per column
    the rule compares (binary: the positive class only)."""
    if isinstance(threshold, dict):
        return np.array([float(threshold.get(n, THRESHOLD)) for n in label_names])
    return np.full(len(label_names) if multilabel else 1, float(threshold if threshold is not None else THRESHOLD))


def decisions(logits: torch.Tensor, multilabel: bool, cuts: np.ndarray | None = None) -> np.ndarray:
    """Predicted labels: (n,) class ids (binary, multiclass) or an (n, k) bool matrix (multilabel)."""
    probs = probabilities(logits, multilabel).numpy()
    if multilabel:
        return probs > (THRESHOLD if cuts is None else cuts[None, :])
    if cuts is None or logits.shape[-1] != 2:
        return probs.argmax(-1)
    return (probs[:, 1] > cuts[0]).astype(int)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str], cuts: np.ndarray | None = None) -> dict:
    """macro_f1, micro_f1, f1/<class>, plus accuracy (one class per row). Inputs: all examples, once each.
    cuts: the decision rule's cuts (cut_vector); None is the plain 0.5 rule."""
    logits = logits.float().cpu()
    labels = labels.cpu()
    multilabel = labels.dtype.is_floating_point
    if multilabel:
        y_true = labels.numpy().astype(bool)
        y_pred = decisions(logits, True, cuts)
        # LexGLUE: an extra "none" column for clauses with no category, where rows have none.
        # Data whose every row has a category (topics) have no such column: its F1 of 0 capped
        # a perfect model at k/(k+1). Decided by the rows alone, the same at every evaluation
        # (a column that came with one empty prediction made scores incomparable); an empty
        # prediction costs its categories' misses.
        none_true, none_pred = ~y_true.any(1, keepdims=True), ~y_pred.any(1, keepdims=True)
        names = list(label_names)
        if none_true.any():
            y_true, y_pred = np.concatenate([y_true, none_true], 1), np.concatenate([y_pred, none_pred], 1)
            names.append("none")
    else:
        pred = decisions(logits, False, cuts)
        k = logits.shape[-1]
        y_true = np.eye(k, dtype=bool)[labels.numpy()]
        y_pred = np.eye(k, dtype=bool)[pred]
        names = list(label_names)
    tp = (y_true & y_pred).sum(0).astype(float)
    fp = (~y_true & y_pred).sum(0).astype(float)
    fn = (y_true & ~y_pred).sum(0).astype(float)
    per_class = _f1(tp, fp, fn)
    out = {
        "macro_f1": float(per_class.mean()),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
    }
    if not multilabel:
        out["accuracy"] = float((y_true == y_pred).all(1).mean())
    for name, value in zip(names, per_class):
        out[f"f1/{name}"] = float(value)
    return out


# Tuning the cut: a grid over a limited range; 0.5 stays unless it scores more than
# TUNE_TOLERANCE below the best, and then the middle of the plateau of cuts scoring within
# TUNE_TOLERANCE of the best is taken, not the single best point. On UNFAIR-ToS's
# 45 validation positives the arg-max cut lands at an edge (0.97 in one run) and hurt
# held-out F1; the plateau's middle moves only as far as the evidence is flat-topped.
TUNE_GRID = np.round(np.arange(0.10, 0.9001, 0.01), 2)
TUNE_TOLERANCE = 0.01


def plateau_middle(scores: np.ndarray, grid: np.ndarray = TUNE_GRID, tolerance: float = TUNE_TOLERANCE) -> float:
    """The middle of the run of adjacent grid points around the best score that stay
    within `tolerance` of it (the first best on ties)."""
    best = int(np.argmax(scores))
    near = scores >= scores[best] - tolerance
    lo, hi = best, best
    while lo > 0 and near[lo - 1]:
        lo -= 1
    while hi < len(scores) - 1 and near[hi + 1]:
        hi += 1
    return float(grid[(lo + hi) // 2])


def choose_cut(scores: np.ndarray, grid: np.ndarray = TUNE_GRID, tolerance: float = TUNE_TOLERANCE) -> float:
    """0.5 unless it scores clearly (more than `tolerance`) below the best cut; then the
    middle of the best plateau. A cut that moves therefore scores above 0.5 on the rows it
    was tuned on, and one that would not clearly help is not taken."""
    at_half = scores[np.isclose(grid, THRESHOLD)]
    if at_half.size and at_half[0] >= scores.max() - tolerance:
        return THRESHOLD
    return plateau_middle(scores, grid, tolerance)


def tune_cuts(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str]):
    """The tuned "threshold" for launcher.json, maximising macro-F1 as evaluation computes it:
    binary, one cut on the positive class's probability; multilabel, one cut per category,
    each in turn (label order, from all at 0.5) for the macro-F1 of every category and the
    `none` column with the others' cuts held. A category's own F1 is not the aim: a cut
    that lifts it (predicting a category with no signal on every clause) can empty `none`
    and lower the whole. Each move passes choose_cut, so the tuned rule scores at least the
    0.5 rule's macro-F1 on these rows. A category with no validation positive keeps 0.5, and
    so does a binary cut when validation holds one class only (the cut then only trades the
    absent class away: 0.86 on 50 fair rows)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    if not labels.dtype.is_floating_point:
        if len(set(labels.tolist())) < 2:
            return THRESHOLD

        def macro(cut):
            return compute_metrics(logits, labels, label_names, np.array([cut]))["macro_f1"]
        return choose_cut(np.array([macro(c) for c in TUNE_GRID]))
    probs = probabilities(logits, True).numpy()
    truth = labels.numpy().astype(bool)
    cuts = np.full(len(label_names), THRESHOLD)
    for j in np.flatnonzero(truth.any(0)).tolist():
        cuts[j] = choose_cut(joint_macro_f1(probs, truth, cuts, j))
    return {name: float(cut) for name, cut in zip(label_names, cuts)}


def joint_macro_f1(probs: np.ndarray, truth: np.ndarray, cuts: np.ndarray, j: int, grid: np.ndarray = TUNE_GRID) -> np.ndarray:
    """Multilabel macro-F1 as compute_metrics gives it (every category, and the `none` column where rows have no category),
    for each cut of category j on `grid`, the others' cuts held: one pass over the rows per
    grid point for column j and `none` only, the other columns' counts once (k categories
    then cost k passes, not k squared)."""
    pred = probs > cuts[None, :]
    others = np.delete(np.arange(truth.shape[1]), j)
    t_o, p_o = truth[:, others], pred[:, others]
    fixed = _f1((t_o & p_o).sum(0), (~t_o & p_o).sum(0), (t_o & ~p_o).sum(0)).sum()
    p_j = probs[:, j][None, :] > grid[:, None]  # (grid, rows)
    t_j = truth[:, j][None, :]
    f1_j = _f1((t_j & p_j).sum(1), (~t_j & p_j).sum(1), (t_j & ~p_j).sum(1))
    t_none = ~np.asarray(truth.any(1))[None, :]
    p_none = ~(np.asarray(p_o.any(1))[None, :] | p_j)
    f1_none = _f1((t_none & p_none).sum(1), (~t_none & p_none).sum(1), (t_none & ~p_none).sum(1))
    if not t_none.any():  # (the none column only where rows have no category, as compute_metrics)
        return (fixed + f1_j) / truth.shape[1]
    return (fixed + f1_j + f1_none) / (truth.shape[1] + 1)


# ---------------------------------------------------------------- exported models


def load_exported(model_dir: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer, label_names, multilabel, cuts) from a `model/` export or any HF
    classifier dir; cuts is the decision rule of its launcher.json (None: the 0.5 rule)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise ConfigError(models.not_a_model_dir(model_dir))
    code = remote_code_gate(model_dir, trust_remote_code)
    model = models.exported(AutoModelForSequenceClassification, str(model_dir), output_loading_info=True,
                            **code)  # pooled as it records
    models.warn_new_weights(model, str(model_dir))  # (a plain encoder's folder: a random head)
    tokenizer = models.exported(AutoTokenizer, str(model_dir), **code)
    if tokenizer.pad_token_id is None:  # a decoder classifier saved elsewhere (launcher's exports keep EOS as pad)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{model_dir}: its tokenizer has neither a pad token nor an EOS token to pad batches with")
        print(pad_with_eos(tokenizer, "the head reads each text's last real token"), file=sys.stderr)
    if model.config.pad_token_id is None:  # the head finds each row's last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    multilabel = is_multilabel(model.config)
    info = models.export_meta(model_dir)
    threshold = checked_threshold(info.get("threshold"), names, multilabel, Path(model_dir) / "launcher.json")
    tuned = info.get("threshold_tuned") or threshold not in (None, THRESHOLD)  # a tuned rule, even if it kept 0.5
    cuts = cut_vector(threshold, names, multilabel) if tuned else None
    model.launcher_max_length = info.get("max_length")  # the training max_length, for eval and predict (not saved)
    model.launcher_class_weights = info.get("class_weights")  # the evaluation loss's weights (mean_loss)
    return model.to(inference_device()).eval(), tokenizer, names, multilabel, cuts


def text_limit(model, max_length: int | None = None) -> tuple[int, str]:
    """The tokens a text is scored on, and why: max_length (--max-length), else the training
    max_length the export recorded (else 512), within the model's positions."""
    trained = getattr(model, "launcher_max_length", None)
    asked: int = max_length or trained or 512
    why = "--max-length" if max_length else "the training max_length" if trained else "no max_length recorded: 512"
    positions: int = position_limit(model) or getattr(model.config, "max_position_embeddings", None) or asked
    return (asked, why) if asked <= positions else (positions, "the model's positions")


@torch.no_grad()
def batched_logits(model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 32,
                   cut: list[int] | None = None) -> torch.Tensor:
    """Logits in batches on the model's device, each text's first text_limit tokens, so a model
    is scored on the inputs it was trained on; `cut` collects the indices of longer texts."""
    limit, _ = text_limit(model, max_length)
    out = []
    for i in range(0, len(texts), batch_size):
        # Padded on the right, as training's batches are, whatever the tokenizer's padding_side:
        # with absolute positions (GPT-2's) left padding shifts every real token's position.
        with settings_kept(tokenizer):
            # Tokenized once, one token past the limit: a text that reaches it is longer (said, as
            # `cut`), and only those are tokenized again at the limit (their special tokens end it).
            batch = texts[i : i + batch_size]
            enc = tokenizer(batch, truncation=True, max_length=limit + 1)
            longer = [j for j, ids in enumerate(enc["input_ids"]) if len(ids) > limit]
            if longer:
                again = tokenizer([batch[j] for j in longer], truncation=True, max_length=limit)
                for key in again:
                    for j, value in zip(longer, again[key]):
                        enc[key][j] = value
            if cut is not None:
                cut += [i + j for j in longer]
            enc = tokenizer.pad(enc, padding=True, padding_side="right", return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


def prediction_record(probs: torch.Tensor, names: list[str], multilabel: bool, cuts: np.ndarray | None = None) -> dict:
    record: dict = {"probs": {n: round(float(p), 6) for n, p in zip(names, probs)}}
    if multilabel:
        limits = cuts if cuts is not None else np.full(len(names), THRESHOLD)
        record["labels"] = [n for n, p, c in zip(names, probs, limits) if p > c]
    elif cuts is not None and len(names) == 2:
        record["label"] = names[int(float(probs[1]) > cuts[0])]
    else:
        record["label"] = names[int(probs.argmax())]
    return record


# ---------------------------------------------------------------- the loop's view


class ClassificationTask:
    """What the training loop needs from clause classification (see tasks/__init__.py)."""

    name = "classification"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.label_names = cfg.data.resolved_label_names()
        self.weights: torch.Tensor | None = None
        self.weights_cpu: torch.Tensor | None = None  # loss_items reads these: no device-to-host copy there
        self.threshold = THRESHOLD  # launcher.json's decision rule; tune() may replace it
        self.tuned = False  # tune() ran: checkpoints and best/ snapshots written before it hold the 0.5 rule
        self.pad_note = ""
        self.new_note = ""  # LoRA's modules_to_save grown by what the load initialised
        self.fresh_note = ""  # else the weights the load initialised at random (models.new_weights_note)

    def check_model_source(self) -> None:
        check_model_source(self.cfg)

    def random_init(self) -> bool:
        return random_init(self.cfg)

    def sources(self, train_file, val_file):
        """Where each split's rows come from (local files or save_to_disk directories; the hub
        dataset when both are None). Nothing is read yet."""
        import dataclasses

        from launcher.data import sources

        d = dataclasses.replace(self.cfg.data, train_file=train_file, validation_file=val_file)
        return sources.resolve(d, "train"), sources.resolve(d, "validation")

    def write_synthetic(self, out_dir: Path):
        from launcher.data import synthetic

        s = self.cfg.data.synthetic
        synthetic.write_splits(out_dir, s.n_train, s.n_validation, s.seed)
        return str(out_dir / "train.jsonl"), str(out_dir / "validation.jsonl")

    def tokenizer(self, saved_dir: Path, train_source, cache):
        """A decoder LM's tokenizer often has no pad token: it pads with EOS then (masked out of
        attention). Its sequence-classification head reads the last token that is not the pad
        token (transformers' rule), which under right padding is the text's own last token."""
        tok = load_tokenizer(self.cfg, saved_dir, train_source, cache)
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise ConfigError(f"model.name: {self.cfg.model.name}: the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_note = pad_with_eos(tok, "masked out of attention; the head reads each text's last token")
        return tok

    def datasets(self, train_source, val_source, tokenizer, cache):
        """Token rows of both splits, checked and tokenized once per cache, memory-mapped."""
        from launcher.data import pipeline
        from launcher.data.batching import tokenizer_fingerprint
        from launcher.data.clauses import ClauseEncoder

        d = self.cfg.data
        encode = ClauseEncoder(d.mode, self.label_names, tokenizer, d.max_length, (d.text_column, d.label_column))
        key = {"task": self.name, "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": d.max_length,
               "mode": d.mode, "labels": self.label_names, "columns": [d.text_column, d.label_column]}
        return tuple(pipeline.prepare(pipeline.Split(src, encode, ("input_ids", "labels"), key, check=encode.check,
                                                     check_columns=encode.check_columns),
                                      cache, d.num_proc) for src in (train_source, val_source))

    def train_examples(self, train_ds) -> int:
        return len(train_ds)

    def describe(self, train_ds, val_ds) -> tuple[list[str], dict]:
        k = len(self.label_names)
        unseen = unseen_notes(train_ds.column_sums("labels", k), val_ds.column_sums("labels", k), self.label_names)
        return [note for note in (self.pad_note, self.new_note, self.fresh_note, *unseen) if note], {}

    def eval_loader(self, rt, val_ds, batch_size: int, tokenizer):
        """Validation batches, shortest rows first, dealt to the ranks by accelerate (its
        gather_for_metrics then counts every row once)."""
        loader = torch.utils.data.DataLoader(val_ds.order_by_length(), batch_size=batch_size,
                                             collate_fn=self.collator(tokenizer))
        return rt.accelerator.prepare_data_loader(loader)

    def build_model(self, tokenizer, dtype: str = "float32"):
        from launcher.tasks import modeling

        from launcher.tasks import lora

        model = modeling.finish(build_model(self.cfg, tokenizer, dtype), self.cfg, self.name, dtype)
        self.new_note = lora.new_note(model, self.cfg.model.name, self.name)
        # (said at a fresh start only: a resume's checkpoint restores them, see Trainer's setup)
        self.fresh_note = "" if self.new_note else models.new_weights_note(model, self.cfg.model.name)
        return model

    def collator(self, tokenizer):
        from launcher.data.batching import PadCollator

        return PadCollator(tokenizer.pad_token_id)

    def prepare(self, train_ds, device) -> None:
        if self.cfg.class_weighting == "balanced":
            self.weights_cpu = class_weights(train_ds.column("labels"), self.cfg.data.mode == "multilabel",
                                             len(self.label_names))
            self.weights = self.weights_cpu.to(device)

    def loss_items(self, batch) -> float:
        """What the step's loss is a mean over: examples, or their class weights (binary
        with class_weighting: torch's weighted-mean definition of cross-entropy)."""
        labels = batch["labels"]
        if self.weights_cpu is not None and not labels.dtype.is_floating_point:
            return float(self.weights_cpu.double()[labels.cpu()].sum())
        return float(labels.shape[0])

    def row_items(self, train_ds) -> torch.Tensor:
        """1 per example, or its class's weight (binary with class_weighting)."""
        labels = train_ds.column("labels")
        if self.weights_cpu is not None and not labels.dtype.is_floating_point:
            return self.weights_cpu.double()[labels]
        return torch.ones(len(labels), dtype=torch.float64)

    def check_loss(self, rt, model, val_ds) -> None:
        """The loss is the model's own logits through (weighted) cross-entropy: nothing to check."""
        return None

    def loss_sum(self, model, batch) -> torch.Tensor:
        """Sum of the micro-batch's (weighted) example losses; the loop divides by loss_items
        of the whole global batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_loss(logits, batch["labels"], self.weights).sum()

    @torch.no_grad()
    def evaluate(self, rt, model, loader) -> dict:
        """Metrics (0.5 rule) over the whole eval set, each example counted once across ranks."""
        logits, labels, metrics = self._evaluate(rt, model, loader)
        return metrics

    def tune(self, rt, model, loader, outputs: dict | None = None) -> dict | None:
        """eval.tune_threshold: tune the cut(s) on this eval set and return its metrics under
        the tuned rule, the 0.5 rule's beside them as `<metric>@0.5`; None when off. From
        `outputs` (eval_outputs of the exported evaluation) when given, else a new evaluation."""
        if not self.cfg.eval.tune_threshold:
            return None
        if outputs is not None:
            logits, labels = outputs["logits"], outputs["labels"]
            plain = compute_metrics(logits, labels, self.label_names)
            plain |= {"loss": float(outputs["loss"]), "n": int(len(labels))}
        else:
            logits, labels, plain = self._evaluate(rt, model, loader)
        multilabel = labels.dtype.is_floating_point
        self.threshold, self.tuned = tune_cuts(logits, labels, self.label_names), True
        tuned = compute_metrics(logits, labels, self.label_names, cut_vector(self.threshold, self.label_names, multilabel))
        out = {**tuned, "loss": plain["loss"], "n": plain["n"]}
        out.update({f"{k}@0.5": v for k, v in plain.items() if k not in ("loss", "n")})
        return out

    @torch.no_grad()
    def _evaluate(self, rt, model, loader):
        model.eval()
        logits_all, labels_all, losses = [], [], []
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = per_example_loss(logits, batch["labels"], self.weights)
            logits, labels, loss = rt.accelerator.gather_for_metrics((logits.float(), batch["labels"], loss))
            logits_all.append(logits.cpu())
            labels_all.append(labels.cpu())
            losses.append(loss.cpu())
        model.train()
        logits, labels = torch.cat(logits_all), torch.cat(labels_all)
        metrics = compute_metrics(logits, labels, self.label_names)
        metrics["loss"] = mean_loss(torch.cat(losses), labels, self.weights_cpu)
        metrics["n"] = int(len(labels))
        self._outputs = {"logits": logits, "labels": labels, "loss": torch.tensor(metrics["loss"], dtype=torch.float64)}
        return logits, labels, metrics

    def eval_outputs(self) -> dict | None:
        """The last evaluation's logits, labels and loss, when a threshold is tuned on them."""
        return getattr(self, "_outputs", None) if self.eval_outputs_needed() else None

    def eval_outputs_needed(self) -> bool:
        return bool(self.cfg.eval.tune_threshold)

    def samples(self, rt, model, tokenizer) -> list[dict]:
        return []

    def count_parameters(self) -> tuple[int | None, str]:
        n, source, self.model_config = count_parameters(self.cfg)  # `launcher plan` sizes activations from it
        return n, source

    def count_rows(self) -> tuple[int | None, str]:
        from launcher import sizing

        return sizing.count_rows(self.cfg.task, self.cfg.data)

    def tokenizer_to_save(self, tokenizer):
        return tokenizer

    def metadata(self) -> dict:
        return {"random_base": self.random_init(), "task": self.name, "mode": self.cfg.data.mode, "threshold": self.threshold,
                "threshold_tuned": self.tuned, "labels": self.label_names,
                "max_length": self.cfg.data.max_length,
                # the columns the rows' text and label came from: eval and predict read them
                "text_column": self.cfg.data.text_column, "label_column": self.cfg.data.label_column,
                # the training loss's class weights: `launcher eval` reports the run's evaluation loss
                "class_weights": None if self.weights_cpu is None else self.weights_cpu.tolist()}
