"""Task adapters: what the one training loop asks of a workload, split by concern below
(`TaskData`, `TaskModel`, `TaskEvaluation`, `TaskSizing`; `Task` is all four). The type checker
(`make test-fast`) holds both tasks to them.

`launcher plan` asks only `TaskSizing`, after launcher.sizing, which needs neither torch nor
transformers: no weights loaded, no process group.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Protocol

if typing.TYPE_CHECKING:
    import torch

    from launcher.config import RunConfig


class TaskData(Protocol):
    """Where rows come from and how they become memory-mapped token rows."""

    name: str

    def check_model_source(self) -> None:
        """The model directory or hub name can be read (one line otherwise), before anything is written."""

    def random_init(self) -> bool:
        """A tiny random model (its tokenizer is trained and kept in the run directory)."""

    def sources(self, train_file: str | None, val_file: str | None) -> tuple[Any, Any]:
        """Each split's source (files, a saved dataset, a hub dataset)."""

    def write_synthetic(self, out_dir: Path) -> None:
        """data.synthetic: train.jsonl and validation.jsonl written into out_dir."""

    def tokenizer(self, saved_dir: Path, train_source: Any, cache: Any) -> Any: ...

    def datasets(self, train_source: Any, val_source: Any, tokenizer: Any, cache: Any) -> tuple[Any, Any]:
        """(train rows, validation rows): checked and tokenized once per data cache."""

    def describe(self, train_ds: Any, val_ds: Any) -> tuple[list[str], dict]:
        """Lines to print about the data, and `derived.*` params to log."""

    def train_examples(self, train_ds: Any) -> int:
        """The examples that train (a packed run's rows are blocks of several)."""

    def collator(self, tokenizer: Any) -> Any: ...

    def eval_loader(self, rt: Any, val_ds: Any, batch_size: int, tokenizer: Any) -> Any: ...


class TaskModel(Protocol):
    """The model and the token-exact loss: a micro-batch's SUM of item losses, and its item count."""

    def build_model(self, tokenizer: Any, dtype: str = "float32") -> Any: ...

    def prepare(self, train_ds: Any, device: Any) -> None:
        """What the loss needs from the training rows (class weights), once they are known."""

    def loss_items(self, batch: dict) -> float:
        """Items (response tokens, examples or class weights) the micro-batch's loss sums over."""

    def row_items(self, train_ds: Any) -> torch.Tensor:
        """loss_items of every training row on its own (float64, one per row; after prepare):
        what a row adds to the item count of any batch that holds it. A step's global item
        count is then a sum over the step's rows, which every rank knows (the sampler is a
        pure function of the step), so it needs no collective."""

    def check_loss(self, rt: Any, model: Any, val_ds: Any) -> str | None:
        """Once per attempt, on the prepared model, before any step or evaluation: whether a
        cheaper loss stands in for the model's own (one line when not; every rank alike)."""

    def loss_sum(self, model: Any, batch: dict) -> torch.Tensor: ...


class TaskEvaluation(Protocol):
    """Evaluation (a collective: every rank runs it), the decision rule, generations, metadata."""

    def evaluate(self, rt: Any, model: Any, loader: Any) -> dict: ...

    def tune(self, rt: Any, model: Any, loader: Any, outputs: dict | None = None) -> dict | None:
        """eval.tune_threshold: the rule fitted on validation before the export; None when off.
        `outputs`: the exported evaluation's, kept with the best snapshot (eval_outputs), in
        place of evaluating the model again."""

    def eval_outputs(self) -> dict | None:
        """What tune needs of the evaluation that just ran (tensors; None when nothing)."""

    def eval_outputs_needed(self) -> bool:
        """Whether tune needs eval_outputs (a decision rule is tuned)."""

    def samples(self, rt: Any, model: Any, tokenizer: Any) -> list[dict]:
        """Sample generations ([] when the task has none)."""

    def metadata(self) -> dict:
        """launcher.json beside the exported model."""

    def tokenizer_to_save(self, tokenizer: Any) -> Any:
        """The tokenizer as checkpoints and exports write it."""


class TaskSizing(Protocol):
    """`launcher plan`: sizes without loading weights."""

    def count_parameters(self) -> tuple[int | None, str]: ...

    def count_rows(self) -> tuple[int | None, str]: ...


class Task(TaskData, TaskModel, TaskEvaluation, TaskSizing, Protocol):
    """Everything `launcher train` asks of a workload."""


def for_config(cfg: "RunConfig") -> Task:
    """The run's task, handed its own part of the config (TaskConfig)."""
    from launcher.config import TaskConfig

    task_cfg = TaskConfig.of(cfg)
    if task_cfg.task == "causal_lm":
        from launcher.tasks.causal_lm import CausalLMTask

        return CausalLMTask(task_cfg)
    from launcher.tasks.classification import ClassificationTask

    return ClassificationTask(task_cfg)
