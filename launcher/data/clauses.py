"""Clause data: local JSONL / CSV / Parquet or the LexGLUE hub dataset -> (texts, targets).

A row has `text` and either `label` (0/1 or a class name; a class's name or id in multiclass
mode) or `labels` (a list of category ids or names; empty = fair); data.text_column and
data.label_column name other columns. Every malformed row is reported as
file:line (CSV and JSONL) or file: row N (Parquet), with what was wrong.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from launcher.config import BINARY_LABELS, UNFAIR_TOS_CATEGORIES, DataConfig
from launcher.data.sources import BadRows, ShortRow, read_records  # noqa: F401  (read_records: cli, instructions)
from launcher.errors import DataError

def _python_list(text: str) -> list | None:
    """A list written as Python writes it (single quotes), as pandas' to_csv writes a column of
    lists, or as numpy prints an array ("[0 5]", "[0. 5.]", wrapped over lines when long), as
    to_csv writes a column of arrays; None when it is neither. ast.literal_eval reads literals
    only: no code runs."""
    import ast

    array = re.fullmatch(r"\[([^],'\"]*)\]", text)
    number = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
    if array and all(re.fullmatch(number, item) for item in array.group(1).split()):
        return [int(item) if re.fullmatch(r"[-+]?\d+", item) else _whole(item) for item in array.group(1).split()]
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return parsed if isinstance(parsed, list) else None


def _as_list(value: Any, where: str, column: str = "'labels'") -> list:
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
                parsed = _python_list(text)  # pandas' to_csv of a list column: "['a', 'b']"
                if parsed is None:
                    raise DataError(f"{where}: {column} is not a JSON list: {value!r}") from None
            return list(parsed)
        return [part.strip() for part in text.split("|") if part.strip()]
    raise DataError(f"{where}: {column} must be a list of category ids or names; got {value!r}")


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


def _named(value: Any, table: dict) -> int | None:
    """The id of the class a label value names, case and spaces aside, or None: its text as
    written ("1.0"), else a number as its digits (1, 1.0 and "1" all name a class "1")."""
    if not isinstance(value, (str, int, float)):  # (a bool as its text: classes named true and false)
        return None
    for text in (str(value), str(_whole(value))):
        if (key := text.strip().lower()) in table:
            return table[key]
    return None


class LabelEncoder:
    """Turns a row's `label`/`labels` into the training target for one mode:
    - multiclass (and binary under names of its own): the class id, from `label` (a class name
      or an id) or a `labels` list of one;
    - binary under the default names (fair/unfair): 0/1, from `label` (0, 1, fair, unfair, or an
      UNFAIR-ToS category name: unfair) or `labels`, the clause's categories (any: unfair);
    - multilabel: a multi-hot row over the names, from `labels` (names or ids) or `label` (one
      name; under the default UNFAIR-ToS categories also 0, fair or none: no category).
    A value equal to a class name is that class before it is read as an id: names may be digits
    ("1", "2": the class named "1" is id 0), and then every number is a name (0 is refused)."""

    def __init__(self, mode: str, label_names: list[str], text_column: str = "text", label_column: str | None = None,
                 exported: bool = False):
        """exported: the classes and columns of a trained model (`launcher eval`), which no
        data.* setting changes: messages name none."""
        self.mode, self.exported = mode, exported
        self.names = label_names
        self.text_column, self.label_column = text_column, label_column
        folded = [n.strip().lower() for n in label_names]
        # The UNFAIR-ToS conventions (category lists in binary mode, label 0 as "no category")
        # hold under the default names only: a ham/spam file's "Arbitration" was read as spam.
        self.tos = folded == [n.lower() for n in (BINARY_LABELS if mode == "binary" else UNFAIR_TOS_CATEGORIES)]
        self.one_class = mode == "multiclass" or (mode == "binary" and not self.tos)
        # `labels` lists hold category ids/names: in binary mode any category means unfair.
        self.categories = label_names if mode == "multilabel" else UNFAIR_TOS_CATEGORIES
        self._by_name = {n.strip().lower(): i for i, n in enumerate(self.categories)}
        self._class_by_name = {n: i for i, n in enumerate(folded)} if mode != "multilabel" else {}
        # Names that are numbers ("1".."5" stars) make every number a name: read as an id when
        # no class had its name, a 0 or a 6 was silently another class ("1", or "5" for a 2).
        self._numbered_categories = any(re.fullmatch(r"[-+]?\d+", n) for n in self._by_name)
        self._numbered_classes = any(re.fullmatch(r"[-+]?\d+", n) for n in self._class_by_name)
        self._hint = "" if not self.tos or exported else "; for your own " + (
            "categories" if mode == "multilabel" else "classes") + " set data.label_names"

    def _category(self, item: Any, where: str) -> int:
        if (named := _named(item, self._by_name)) is not None:  # a name first: names may be digits
            return named
        item = _whole(item)
        if isinstance(item, bool):
            raise DataError(f"{where}: category {item!r} is not an id or a name")
        if isinstance(item, str) and item.strip().lstrip("-").isdigit():
            item = int(item)
        if isinstance(item, int) and self._numbered_categories:
            raise DataError(f"{where}: unknown category {item!r}; the categories are named by numbers "
                            f"({', '.join(self.categories)}), so a number is read as a name, not an id")
        if isinstance(item, int):
            # In binary mode any category id counts as unfair (another taxonomy's too), but a
            # negative one is no category: -1 marks "no label" in some datasets.
            if 0 <= item < len(self.categories) or (self.mode == "binary" and item >= 0):
                return item
            if self.mode == "binary":
                raise DataError(f"{where}: category id {item} is negative: a category id is 0 or more")
            raise DataError(f"{where}: category id {item} out of range 0..{len(self.categories) - 1}")
        comma = "; categories in one cell are separated by '|'" if isinstance(item, str) and "," in item else ""
        raise DataError(f"{where}: unknown category {item!r}; expected an id or one of: {', '.join(self.categories)}"
                        f"{comma or self._hint}")

    def _class(self, value: Any, column: str, where: str) -> int:
        """One class of a single-label row: its name, else its id."""
        if (named := _named(value, self._class_by_name)) is not None:
            return named
        given, value = value, _whole(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) and len(self.names) == 2:  # (true / false: class 1 / 0 of two, as before)
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and self._numbered_classes:
            raise DataError(f"{where}: {column} {given!r} is no class: the classes are named by numbers "
                            f"({', '.join(self.names)}), so a number is read as a name, not an id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        ids = "" if self._numbered_classes else f" or an id 0..{len(self.names) - 1}"  # (numbers are names then)
        raise DataError(f"{where}: {column} must be a class name ({', '.join(self.names)}){ids}; got {value!r}")

    def view(self, record: dict) -> dict:
        """The row as `text` and `label` or `labels`, read from data.text_column and
        data.label_column (a list, or any value in multilabel mode, as `labels`)."""
        if self.text_column == "text" and self.label_column is None:
            return record
        out = {"text": record.get(self.text_column)}
        if self.label_column is None:
            out.update({k: record[k] for k in ("label", "labels") if k in record})
            return out
        value = record.get(self.label_column)
        listed = isinstance(value, (list, tuple)) or hasattr(value, "tolist") or (
            self.mode == "multilabel" and not isinstance(value, (int, float))) or (
            isinstance(value, str) and value.lstrip().startswith("["))  # (a CSV cell's list, as in `labels`)
        out["labels" if listed else "label"] = value
        return out

    def _col(self, key: str) -> str:
        """A label key as the file names it, quoted: data.label_column, or 'label' / 'labels'."""
        return repr(self.label_column or key)

    def encode(self, record: dict, where: str):
        """binary and multiclass -> the class id; multilabel -> multi-hot list of floats. A
        problem names data.label_column where it is set (_col)."""
        has_labels = record.get("labels") is not None
        has_label = record.get("label") is not None and record.get("label") != ""
        if has_labels == has_label:
            if self.label_column is not None:
                raise DataError(f"{where}: missing or empty {self.label_column!r}")
            raise DataError(f"{where}: needs exactly one of 'label' or 'labels'")
        if self.one_class:
            if not has_labels:
                return self._class(record["label"], self._col("label"), where)
            items = _as_list(record["labels"], where, self._col("labels"))
            if len(items) == 1 and (self.mode == "multiclass" or _named(items[0], self._class_by_name) is not None):
                return self._class(items[0], self._col("labels"), where)
            if self.mode == "binary" and not any(_named(x, self._class_by_name) is not None for x in items):
                # a clause's categories, as under fair/unfair: any is the second class
                return int(bool(sorted({self._category(x, where) for x in items})))
            raise DataError(f"{where}: {self._col('labels')} {items!r}: data.mode={self.mode} takes one class per row "
                            f"({'none given' if not items else 'data.mode=multilabel for several'})")
        if has_labels:
            items = _as_list(record["labels"], where, self._col("labels"))
            ids = [self._category(x, where) for x in items]
            if len(items) == len(self.categories) >= 2 and len(set(ids)) < len(ids) \
                    and set(map(str, map(_whole, items))) <= {"0", "1"}:
                # [0, 1, 0, ...] is a 0/1 vector over the categories (the common multi-label
                # layout), not ids: read as ids every clause had categories 0 and 1
                raise DataError(f"{where}: {self._col('labels')} {items!r} looks like a 0/1 vector over the categories; "
                                f"launcher reads {self._col('labels')} as the categories a clause has, by id or name (e.g. "
                                "[1, 4], or [] for none)")
            cats = sorted(set(ids))
            if self.mode == "binary":
                return int(bool(cats))
            return [1.0 if i in cats else 0.0 for i in range(len(self.categories))]
        value = record["label"]
        if self.mode == "binary":
            return self._tos_binary(value, where)
        if (named := _named(value, self._by_name)) is not None:  # (a category's name: names may be digits)
            return [1.0 if i == named else 0.0 for i in range(len(self.categories))]
        value = _whole(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        word = value.strip().lower() if isinstance(value, str) else None
        if self.tos and (value == 0 and not isinstance(value, bool) or word in ("fair", "none")):
            return [0.0] * len(self.categories)  # 0 / "fair" / "none": no category (a binary file's fair clause)
        none = "" if self.tos else f"; no category is {self._col('labels')}: []"  # (under names of your own 0 is no "fair")
        if isinstance(value, int) and not isinstance(value, bool) and self._numbered_categories:
            self._category(value, where)  # (no name: refused as a number among categories named by numbers)
        if isinstance(value, int) and not isinstance(value, bool):
            # `label: 1` is "unfair" in binary files, and `label: 0` is fair: read as category
            # ids here, a binary file trained every unfair clause as category 1.
            zero = "label 0 is fair, " if self.tos else ""
            raise DataError(f"{where}: {self._col('label')} {value} is not a category in data.mode=multilabel ({zero}"
                            f"labels: [0] is category 0): give categories as {self._col('labels')}: [{value}] or by "
                            f"name{none}")
        if word in ("fair", "none") and none:
            raise DataError(f"{where}: unknown category {value!r}; expected one of: {', '.join(self.categories)}{none}")
        cat = self._category(value, where)
        return [1.0 if i == cat else 0.0 for i in range(len(self.categories))]

    def _tos_binary(self, value: Any, where: str) -> int:
        """A binary `label` under the default names: a class as _class reads one (fair, unfair,
        0, 1, true, false), or a category's name (unfair)."""
        try:
            return self._class(value, self._col("label"), where)
        except DataError:
            if isinstance(value, str) and value.strip().lower() in {c.lower() for c in UNFAIR_TOS_CATEGORIES}:
                return 1
        raise DataError(f"{where}: {self._col('label')} must be 0, 1, {' or '.join(self.names)}, or an UNFAIR-ToS category name; "
                        f"got {_whole(value)!r}{self._hint}")


def column_problems(columns: list[str], source: str, text: str = "text", label: str | None = None,
                    exported: bool = False) -> list[str]:
    """A file with no text column, or no label column, is one line naming its columns, not
    one line per row (a header written `text, label` or with `;`). text, label: the columns
    data.text_column and data.label_column name (null: `label` or `labels`); exported: those
    an exported model was trained on (`launcher eval`), named as such."""
    have = set(columns)
    labels = {label} if label is not None else {"label", "labels"}
    setting = ("the model's data.text_column", "the model's data.label_column") if exported else ("data.text_column",
                                                                                                "data.label_column")
    named = (f" ({setting[0]})" if text != "text" else "", f" ({setting[1]})" if label is not None else "")
    missing = [name for name, ok in ((f"{text!r}{named[0]}", text in have),
                                     (f"{label!r}{named[1]}" if label else "'label' or 'labels'", bool(have & labels)))
               if not ok]
    if not missing:
        return []
    listed = ", ".join(map(repr, columns)) or "none"
    hint = column_hint(columns) or ("" if text != "text" or label is not None else "; rename the file's columns: an exported "
                                    "model reads the columns it was trained on" if exported else
                                    "; data.text_column and data.label_column name other columns")
    return [f"{source}: no {' and no '.join(missing)} column (its columns: {listed}){hint}"]


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
    if columns and (missing := column_problems(list(columns), source, encoder.text_column, encoder.label_column,
                                               encoder.exported)):
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
        raise DataError(f"{where}: expected an object with {encoder.text_column!r} and "
                        + (f"{encoder.label_column!r}" if encoder.label_column else "'label' or 'labels'"))
    try:
        row = encoder.view(record)
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: missing or empty {encoder.text_column!r}")
        return text, encoder.encode(row, where)
    except DataError:
        if isinstance(record, ShortRow):  # (it was "needs exactly one of 'label' or 'labels'", or a null label)
            raise DataError(record.problem(where)) from None
        raise


class ClauseEncoder:
    """A batch of raw clause rows -> (input_ids, labels, length) in one pass of datasets.map.
    A bad row gets its message in `_error` (see data/pipeline.py) and placeholder tokens.
    Without a tokenizer the rows are only checked, and `text` is returned instead."""

    def __init__(self, mode: str, label_names: list[str], tokenizer=None, max_length: int = 0,
                 columns: tuple[str, str | None] = ("text", None)):
        self.encoder = LabelEncoder(mode, label_names, *columns)
        self.empty = [0.0] * len(self.encoder.categories) if mode == "multilabel" else 0
        self.tokenizer, self.max_length = tokenizer, max_length

    def check(self, where: str, record) -> None:
        check_clause(self.encoder, record, where)

    def check_columns(self, columns: list[str], source: str) -> list[str]:
        return column_problems(columns, source, self.encoder.text_column, self.encoder.label_column)

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
    encoder = ClauseEncoder(cfg.mode, cfg.resolved_label_names(), columns=(cfg.text_column, cfg.label_column))
    with tempfile.TemporaryDirectory() as tmp:
        raw = source.read(Path(tmp), encoder.check)
        if raw.num_rows == 0:
            raise DataError(f"{source}: no rows")
        if problems := encoder.check_columns(list(raw.column_names), str(source)):
            raise DataError(*problems)
        out = pipeline.map_rows(raw, encoder, keep_in_memory=True)
        pipeline._raise_bad_rows(out, source)
        return list(out["text"]), list(out["labels"])
