"""Clause data: local JSONL / CSV / Parquet or the LexGLUE hub dataset -> (texts, targets).

A row has `text` and either `label` (0/1 or a class name) or `labels` (a list of
category ids or names; empty = fair). Every malformed row is reported as
file:line (CSV and JSONL) or file: row N (Parquet), with what was wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from launcher.config import UNFAIR_TOS_CATEGORIES, DataConfig
from launcher.errors import DataError

MAX_REPORTED = 10  # a file with thousands of bad rows gets the first few, then a count


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) with where = 'file:line' for every row of a local file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: not valid JSON ({e.msg})")
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for record in reader:
                yield f"{path}:{reader.line_num}", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", record
    else:
        raise DataError(f"{path}: unsupported format (use .jsonl, .csv or .parquet)")


def _as_list(value: Any, where: str) -> list:
    """`labels` as a list; CSV cells hold JSON ('[0, 5]') or '|'-separated names."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise DataError(f"{where}: 'labels' is not a JSON list: {value!r}") from None
            return list(parsed)
        return [part.strip() for part in text.split("|") if part.strip()]
    raise DataError(f"{where}: 'labels' must be a list of category ids or names; got {value!r}")


class LabelEncoder:
    """Turns a row's `label`/`labels` into the training target for one mode."""

    def __init__(self, mode: str, label_names: list[str]):
        self.mode = mode
        self.names = label_names
        # `labels` lists hold category ids/names: in binary mode any category means unfair.
        self.categories = label_names if mode == "multilabel" else UNFAIR_TOS_CATEGORIES
        self._by_name = {n.lower(): i for i, n in enumerate(self.categories)}
        self._binary_by_name = {n.lower(): i for i, n in enumerate(label_names)} if mode == "binary" else {}

    def _category(self, item: Any, where: str) -> int:
        if isinstance(item, bool):
            raise DataError(f"{where}: category {item!r} is not an id or a name")
        if isinstance(item, str) and item.strip().lstrip("-").isdigit():
            item = int(item)
        if isinstance(item, int):
            if 0 <= item < len(self.categories) or self.mode == "binary":
                return item
            raise DataError(f"{where}: category id {item} out of range 0..{len(self.categories) - 1}")
        if isinstance(item, str) and item.strip().lower() in self._by_name:
            return self._by_name[item.strip().lower()]
        raise DataError(f"{where}: unknown category {item!r}; expected an id or one of: {', '.join(self.categories)}")

    def encode(self, record: dict, where: str):
        """binary -> int 0/1; multilabel -> multi-hot list of floats."""
        has_labels = record.get("labels") is not None
        has_label = record.get("label") is not None and record.get("label") != ""
        if has_labels == has_label:
            raise DataError(f"{where}: needs exactly one of 'label' or 'labels'")
        if has_labels:
            cats = sorted({self._category(x, where) for x in _as_list(record["labels"], where)})
            if self.mode == "binary":
                return int(bool(cats))
            return [1.0 if i in cats else 0.0 for i in range(len(self.categories))]
        value = record["label"]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if self.mode == "binary":
            if isinstance(value, (bool, int)) and int(value) in (0, 1):
                return int(value)
            if isinstance(value, str):
                key = value.strip().lower()
                if key in self._binary_by_name:
                    return self._binary_by_name[key]
                if key in {c.lower() for c in UNFAIR_TOS_CATEGORIES}:
                    return 1
            raise DataError(f"{where}: 'label' must be 0, 1, {' or '.join(self.names)}, or a category name; got {value!r}")
        no_category = (isinstance(value, int) and not isinstance(value, bool) and value == 0) or (
            isinstance(value, str) and value.strip().lower() in ("fair", "none") and value.strip().lower() not in self._by_name
        )
        if no_category:  # 0 / "fair" = no category
            return [0.0] * len(self.categories)
        cat = self._category(value, where)
        return [1.0 if i == cat else 0.0 for i in range(len(self.categories))]


def parse_rows(records, encoder: LabelEncoder, source: str) -> tuple[list[str], list]:
    """All rows or a DataError listing the bad ones (first MAX_REPORTED, then a count)."""
    texts, targets, problems, n_bad = [], [], [], 0
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object with 'text' and 'label' or 'labels'")
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: missing or empty 'text'")
            target = encoder.encode(record, where)
        except DataError as e:
            n_bad += 1
            if len(problems) < MAX_REPORTED:
                problems.extend(e.problems)
            continue
        texts.append(text)
        targets.append(target)
    if n_bad > len(problems):
        problems.append(f"{source}: {n_bad - len(problems)} more bad rows not shown")
    if problems:
        raise DataError(*problems)
    if not texts:
        raise DataError(f"{source}: no rows")
    return texts, targets


def load_split(cfg: DataConfig, split: str, path: str | None) -> tuple[list[str], list]:
    """(texts, targets) for one split, from a local file or the hub dataset."""
    encoder = LabelEncoder(cfg.mode, cfg.resolved_label_names())
    if path is not None:
        return parse_rows(read_records(path), encoder, str(path))
    dataset = load_hub_split(cfg.hub_dataset, cfg.hub_config, split)
    name = f"{cfg.hub_dataset}/{cfg.hub_config}:{split}"
    return parse_rows(((f"{name}: row {i}", r) for i, r in enumerate(dataset, 1)), encoder, name)


def load_hub_split(dataset: str, config: str, split: str):
    hint = (
        f"data.hub_dataset: cannot load {dataset} ({config}, split {split}) from the Hugging Face Hub "
        "(no network, or not cached); download it where you have access and pass local files: "
        "data.train_file=train.jsonl data.validation_file=validation.jsonl (text + labels per row)"
    )
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError(hint) from None
    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # the hub client raises many types for "unreachable"
        raise DataError(f"{hint} [{type(e).__name__}]") from None
