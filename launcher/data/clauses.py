"""Clause data: local JSONL / CSV / Parquet or the LexGLUE hub dataset -> (texts, targets).

A row has `text` and either `label` (0/1 or a class name) or `labels` (a list of
category ids or names; empty = fair). Every malformed row is reported as
file:line (CSV and JSONL) or file: row N (Parquet), with what was wrong.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from launcher.config import UNFAIR_TOS_CATEGORIES, DataConfig
from launcher.data.sources import BadRows, read_records  # noqa: F401  (read_records: cli, instructions)
from launcher.errors import DataError

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


def _whole(value: Any) -> Any:
    """A whole-number float (1.0) as the int it stands for. A JSON or Parquet reader turns a
    whole label column into floats when one row writes 1.0 (pandas writes labels so), and
    every row was refused; NaN and 0.5 stay floats, refused on their own line. In a CSV the
    cell is the text "1.0" (pandas' to_csv of a float column): its int too."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,15}\.0*\s*", value):
        return int(float(value))
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # (1e20 is no id)
        return int(value)
    return value


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
        if isinstance(item, str) and item.strip().lower() in self._by_name:  # a name first: names may be digits
            return self._by_name[item.strip().lower()]
        item = _whole(item)
        if isinstance(item, bool):
            raise DataError(f"{where}: category {item!r} is not an id or a name")
        if isinstance(item, str) and item.strip().lstrip("-").isdigit():
            item = int(item)
        if isinstance(item, int):
            # In binary mode any category id counts as unfair (another taxonomy's too), but a
            # negative one is no category: -1 marks "no label" in some datasets.
            if 0 <= item < len(self.categories) or (self.mode == "binary" and item >= 0):
                return item
            if self.mode == "binary":
                raise DataError(f"{where}: category id {item} is negative: a category id is 0 or more")
            raise DataError(f"{where}: category id {item} out of range 0..{len(self.categories) - 1}")
        raise DataError(f"{where}: unknown category {item!r}; expected an id or one of: {', '.join(self.categories)}")

    def encode(self, record: dict, where: str):
        """binary -> int 0/1; multilabel -> multi-hot list of floats."""
        has_labels = record.get("labels") is not None
        has_label = record.get("label") is not None and record.get("label") != ""
        if has_labels == has_label:
            raise DataError(f"{where}: needs exactly one of 'label' or 'labels'")
        if has_labels:
            items = _as_list(record["labels"], where)
            ids = [self._category(x, where) for x in items]
            if len(items) == len(self.categories) >= 2 and len(set(ids)) < len(ids) \
                    and set(map(str, map(_whole, items))) <= {"0", "1"}:
                # [0, 1, 0, ...] is a 0/1 vector over the categories (the common multi-label
                # layout), not ids: read as ids every clause had categories 0 and 1
                raise DataError(f"{where}: 'labels' {items!r} looks like a 0/1 vector over the categories; launcher "
                                "reads 'labels' as the categories a clause has, by id or name (e.g. [1, 4], or [] for none)")
            cats = sorted(set(ids))
            if self.mode == "binary":
                return int(bool(cats))
            return [1.0 if i in cats else 0.0 for i in range(len(self.categories))]
        value = record["label"]
        if isinstance(value, str) and self.mode == "multilabel" and value.strip().lower() in self._by_name:
            return [1.0 if i == self._by_name[value.strip().lower()] else 0.0 for i in range(len(self.categories))]
        if not (isinstance(value, str) and value.strip().lower() in self._binary_by_name):  # (a name first)
            value = _whole(value)
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
            isinstance(value, str) and value.strip().lower() in ("fair", "none")  # (a category's own name returned above)
        )
        if no_category:  # 0 / "fair" = no category
            return [0.0] * len(self.categories)
        if isinstance(value, int) and not isinstance(value, bool):
            # `label: 1` is "unfair" in binary files, and `label: 0` is fair: read as category
            # ids here, a binary file trained every unfair clause as category 1.
            raise DataError(f"{where}: 'label' {value} is not a category in data.mode=multilabel (label 0 is fair, "
                            f"labels: [0] is category 0): give categories as 'labels': [{value}] or by name")
        cat = self._category(value, where)
        return [1.0 if i == cat else 0.0 for i in range(len(self.categories))]


def column_problems(columns: list[str], source: str) -> list[str]:
    """A file with no `text` column, or no label column, is one line naming its columns, not
    one line per row (a header written `text, label` or with `;`)."""
    have = set(columns)
    missing = [name for name, ok in (("'text'", "text" in have), ("'label' or 'labels'", bool(have & {"label", "labels"})))
               if not ok]
    if not missing:
        return []
    listed = ", ".join(map(repr, columns)) or "none"
    return [f"{source}: no {' and no '.join(missing)} column (its columns: {listed}){column_hint(columns)}"]


def column_hint(columns: list) -> str:
    """Why a header lacks a column it seems to name: "; ..." or ""."""
    names = [c for c in columns if isinstance(c, str)]
    if any(c.strip() != c for c in names):
        return "; a column name has spaces around it (a space after a comma in the header?)"
    if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
        return "; CSV columns are separated by commas"
    return ""


def parse_rows(records, encoder: LabelEncoder, source: str) -> tuple[list[str], list]:
    """All rows of a small file (eval) or a DataError listing the bad ones (first MAX_REPORTED,
    then a count); a file whose columns lack `text` or a label is one line (column_problems)."""
    records = list(records)
    columns = dict.fromkeys(k for _, r in records if isinstance(r, dict) for k in r if isinstance(k, str))
    if columns and (missing := column_problems(list(columns), source)):
        raise DataError(*missing)
    texts: list[str] = []
    targets: list = []
    bad = BadRows(source)
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            text, target = check_clause(encoder, record, where)
        except DataError as e:
            bad.add(e.problems)
            continue
        texts.append(text)
        targets.append(target)
    bad.check()
    if not texts:
        raise DataError(f"{source}: no rows")
    return texts, targets


def check_clause(encoder: LabelEncoder, record, where: str):
    """A clause row's (text, target), or DataError naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with 'text' and 'label' or 'labels'")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty 'text'")
    return text, encoder.encode(record, where)


class ClauseEncoder:
    """A batch of raw clause rows -> (input_ids, labels, length) in one pass of datasets.map.
    A bad row gets its message in `_error` (see data/pipeline.py) and placeholder tokens.
    Without a tokenizer the rows are only checked, and `text` is returned instead."""

    def __init__(self, mode: str, label_names: list[str], tokenizer=None, max_length: int = 0):
        self.encoder = LabelEncoder(mode, label_names)
        self.empty = 0 if mode == "binary" else [0.0] * len(self.encoder.categories)
        self.tokenizer, self.max_length = tokenizer, max_length

    def check(self, where: str, record) -> None:
        check_clause(self.encoder, record, where)

    def check_columns(self, columns: list[str], source: str) -> list[str]:
        return column_problems(columns, source)

    def __call__(self, batch: dict) -> dict:
        from launcher.data.pipeline import ROW, records
        from launcher.data.tokenizer import settings_kept

        texts, targets, errors = [], [], []
        for record in records(batch):
            try:
                text, target = check_clause(self.encoder, record, ROW)
                error = ""
            except DataError as e:
                text, target, error = "", self.empty, e.problems[0]
            texts.append(text)
            targets.append(target)
            errors.append(error)
        if self.tokenizer is None:
            return {"text": texts, "labels": targets, "_error": errors}
        with settings_kept(self.tokenizer):
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return {"input_ids": ids, "labels": targets, "length": [len(x) for x in ids], "_error": errors}


def load_split(cfg: DataConfig, split: Literal["train", "validation"], path: str | None) -> tuple[list[str], list]:
    """(texts, targets) of one whole split in memory, checked as training checks it (small
    data: tests, `plan`). Training itself reads splits through data/pipeline.py."""
    import dataclasses

    from launcher.data import pipeline, sources

    cfg = dataclasses.replace(cfg, train_file=path) if split == "train" else dataclasses.replace(cfg, validation_file=path)
    source = sources.resolve(cfg, split)
    encoder = ClauseEncoder(cfg.mode, cfg.resolved_label_names())
    with tempfile.TemporaryDirectory() as tmp:
        raw = source.read(Path(tmp), encoder.check)
        if raw.num_rows == 0:
            raise DataError(f"{source}: no rows")
        if problems := encoder.check_columns(list(raw.column_names), str(source)):
            raise DataError(*problems)
        out = pipeline.map_rows(raw, encoder, keep_in_memory=True)
        pipeline._raise_bad_rows(out, source)
        return list(out["text"]), list(out["labels"])
