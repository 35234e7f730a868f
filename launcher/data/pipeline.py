"""Rows -> validated token rows in a memory-mapped Arrow table, built once per cache.

One pass of `datasets.map(batched=True)` both checks every row and tokenizes it with the
fast tokenizer's batch path: a bad row yields an `_error` message instead of stopping the
pass, and the first MAX_REPORTED of them are reported as `file:line` with a count of the
rest. The result is saved with `save_to_disk` into the cache (data/cache.py) and every
rank memory-maps it with `load_from_disk`: token ids stay in the page cache, shared by
the ranks of a node, and never become Python lists until a micro-batch is collated.
Per-rank memory is then the Arrow mapping plus one int32 length per row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from launcher.data.cache import Cache, key_of
from launcher.data.sources import MAX_REPORTED, BadRows, Source
from launcher.errors import DataError, UserError

ROW = "\x00row"  # stands for a row's `file:line` inside messages built during the map
SMALL = 20_000  # below this many rows, extra tokenizing processes cost more than they save


def auto_num_proc(n_rows: int, requested: int | None) -> int:
    if requested:
        return requested
    if n_rows < SMALL:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class TokenRows(torch.utils.data.Dataset):
    """A split's token rows, memory-mapped. Items are dicts of the listed columns."""

    def __init__(self, ds, meta: dict, from_cache: bool, columns: tuple[str, ...], source: str = "", digest: str = ""):
        self.ds = ds.select_columns(list(columns))
        # What the rows came from, and the cache key of their tokens (the source's path, size and
        # mtime with every tokenization setting): what a tracker records as the run's input.
        self.source, self.digest = source, digest
        self.meta = meta
        self.from_cache = from_cache  # read from the cache rather than tokenized here
        self.columns = columns
        self.lengths = np.asarray(ds.data.column("length").to_numpy(), dtype=np.int32)

    def __len__(self) -> int:
        return self.ds.num_rows

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]

    def __getitems__(self, idx: list[int]) -> list[dict]:
        cols = self.ds[[int(i) for i in idx]]  # one Arrow take for the whole micro-batch
        return [{c: cols[c][k] for c in self.columns} for k in range(len(idx))]

    def column(self, name: str) -> torch.Tensor:
        """A whole column as one tensor (class labels: ints, or one row of floats per example)."""
        values = torch.as_tensor(np.asarray(self.ds.with_format("numpy")[name]))
        return values.float() if values.is_floating_point() else values

    def column_sums(self, name: str, size: int, batch_rows: int = 65536) -> np.ndarray:
        """A label column counted without holding it whole: class ids -> rows per class; one
        row of 0/1 per example -> its column sums (`size` of them; memory-mapped batches)."""
        total = np.zeros(size, dtype=np.int64)
        for start in range(0, self.ds.num_rows, batch_rows):
            part = np.asarray(self.ds.with_format("numpy")[start : start + batch_rows][name])
            total += part.sum(0).astype(np.int64) if part.ndim == 2 else np.bincount(part.astype(np.int64), minlength=size)[:size]
        return total

    def order_by_length(self) -> "TokenRows":
        """The same rows, shortest first (validation: the order does not change any metric,
        and neighbours of similar length waste little padding)."""
        view = TokenRows.__new__(TokenRows)
        order = np.argsort(self.lengths, kind="stable")
        view.ds, view.meta, view.from_cache, view.columns = self.ds.select(order), self.meta, self.from_cache, self.columns
        view.lengths = self.lengths[order]
        view.source, view.digest = self.source, self.digest
        return view

    def attention_context(self) -> float:
        """The context a token attends over, averaged over the split's tokens: sum(s^2) / sum(s)
        over its sequences, s real tokens each; a packed block's examples count apart, as they
        attend only within themselves. MFU's attention term (throughput.flops_per_token)."""
        if "seq_lens" in self.columns:
            import pyarrow.compute as pc

            s = pc.list_flatten(self.ds.data.column("seq_lens")).to_numpy().astype(np.float64)
        else:
            s = self.lengths.astype(np.float64)
        return float((s * s).sum() / max(1.0, s.sum()))

    def packing_efficiency(self, block: int) -> float:
        """Real tokens / slots when every row is padded to `block` (packed rows fill it)."""
        return float(self.lengths.sum()) / max(1, block * len(self))


CODE_LIBRARIES = ("datasets", "tokenizers", "transformers", "jinja2")  # they read, render and tokenize rows


def _code_fingerprint(files: list[Path], libraries: tuple[str, ...]) -> str:
    from importlib import metadata

    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name in libraries:
        try:
            digest.update(f"{name}={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none\0".encode())
    return digest.hexdigest()[:16]


@functools.cache
def code_fingerprint() -> str:
    """The code that turns rows into tokens, in every token-cache key: launcher's readers and
    encoders (launcher/data, launcher/tasks) and the libraries under them. A hit skips every
    row check, so an entry built by an older launcher (which, say, read a [0, 1] label vector
    as categories that are refused now) was trained on without a word; a hand-bumped
    CACHE_VERSION missed such changes. Any change there tokenizes once more."""
    here = Path(__file__).parent  # launcher/data, and launcher/tasks beside it (no import: they import this)
    roots = (here, here.parent / "tasks")
    return _code_fingerprint([f for root in roots for f in sorted(root.glob("*.py"))], CODE_LIBRARIES)


@dataclass
class Split:
    """What to build for one split: the rows, the per-batch encoder and the columns it yields."""

    source: Source
    encode: Callable[[dict], dict]  # a batch of raw columns -> output columns plus `_error`
    columns: tuple[str, ...]
    key: dict  # everything besides the source that changes the tokens
    check: Callable[[str, dict], None] | None = None  # (where, record): raises DataError for a bad row
    finish: Callable | None = None  # (Dataset) -> (Dataset, stats dict): drop, pack, count
    check_columns: Callable[[list, str], list] | None = None  # (column names, source) -> one line per problem


def prepare(split: Split, cache: Cache, num_proc: int | None = None) -> TokenRows:
    """The split's token rows: from the cache, or built here once for everyone."""
    parts = {"source": split.source.fingerprint(), "what": str(split.source), "code": code_fingerprint(), **split.key}

    def build(tmp: Path, stage) -> None:
        stage(f"reading {split.source}")
        raw = split.source.read(cache.root / "datasets", split.check)
        if raw.num_rows == 0:
            raise DataError(f"{split.source}: no rows")
        if split.check_columns is not None:  # a file-wide problem is one line, not one per row
            problems = split.check_columns(list(raw.column_names), str(split.source))
            if problems:
                raise DataError(*problems)
        n_proc = min(auto_num_proc(raw.num_rows, num_proc), max(1, raw.num_rows // 1000))
        if n_proc > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the forked workers parallelise instead
        stage(f"checking and tokenizing {raw.num_rows:,} rows of {split.source} in {n_proc} process(es)")
        work = tmp / "work"
        work.mkdir()
        out = map_rows(raw, split.encode, num_proc=n_proc if n_proc > 1 else None, load_from_cache_file=False,
                       cache_file_name=str(work / "map.arrow"), new_fingerprint=key_of(parts))
        _raise_bad_rows(out, split.source)
        out = out.remove_columns("_error")
        stats: dict = {"rows": raw.num_rows}
        if split.finish is not None:
            stage(f"finishing {split.source}")
            try:
                out, stats = split.finish(out)
            except DataError as e:  # ("no usable rows": of which split)
                raise DataError(*(f"{split.source}: {p}" for p in e.problems)) from None
        if out.num_rows == 0:
            raise DataError(f"{split.source}: no rows")
        stage(f"writing {out.num_rows:,} rows")
        out.save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps({"rows": out.num_rows, "stats": stats}))
        del out
        shutil.rmtree(work, ignore_errors=True)  # the map's own files: data/ holds the result

    path, built_here = cache.get("tokens", parts, build)
    import datasets

    ds = datasets.load_from_disk(str(path / "data"))
    meta = json.loads((path / "meta.json").read_text())
    return TokenRows(ds, meta, from_cache=not built_here, columns=split.columns, source=str(split.source),
                     digest=key_of(parts))


def _raise_bad_rows(out, source: Source) -> None:
    import pyarrow.compute as pc

    errors = out.data.column("_error")
    bad = pc.not_equal(errors, "")
    n_bad = pc.sum(bad).as_py() or 0
    if not n_bad:
        return
    indices = np.flatnonzero(np.asarray(bad.to_numpy(zero_copy_only=False)))[:MAX_REPORTED].tolist()
    where = source.locate(indices)
    reported = BadRows(str(source))
    for i in indices:
        reported.add([errors[i].as_py().replace(ROW, where[i], 1)])
    reported.rows = n_bad  # the rest were counted, not read
    reported.check()


RAW = "raw:"  # the input columns' prefix during a map: no output column can collide with them


def map_rows(raw, encode, **kwargs):
    """`encode` over batches of raw rows; the output holds only what encode returns. The raw
    columns are renamed first: a map that returns a column named like an input column (a
    `labels` column of category lists -> a `labels` class id) would keep the input's type."""
    raw = raw.rename_columns({c: RAW + c for c in raw.column_names})
    return raw.map(encode, batched=True, batch_size=1000, remove_columns=raw.column_names, **kwargs)


def records(batch: dict) -> list[dict]:
    """A batch of raw columns -> one dict per row, leaving out null cells (a column that exists
    for some rows of a JSONL file is null in the others: to the checks it is absent)."""
    keys = list(batch)
    names = [k[len(RAW):] if k.startswith(RAW) else k for k in keys]
    n = len(batch[keys[0]]) if keys else 0
    return [{name: batch[k][i] for k, name in zip(keys, names) if batch[k][i] is not None} for i in range(n)]


TOKENIZER_ROWS = 100_000  # a tiny model's tokenizer learns its vocabulary from at most this many rows


def first_rows(source: Source, cache: Cache, check=None, n: int = TOKENIZER_ROWS):
    """The first n raw rows of a source (for training a tiny model's tokenizer), as dicts."""
    raw = source.read(cache.root / "datasets", check)
    head = raw.select(range(min(n, raw.num_rows)))
    for batch in head.iter(batch_size=1000):
        yield from records(batch)


def saved_tokenizer(saved_dir: Path):
    """A tiny model's tokenizer kept in its run directory (or a checkpoint's skeleton). Written
    whole since 2026-12; a kill during an older launcher's first write could leave tokenizer.json
    cut short, which read as a JSON traceback: now one line. The file is rebuilt from the same
    training rows (through the data cache, where the first build sits) once it is removed."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(saved_dir)
    except Exception as e:  # JSONDecodeError, the tokenizers library's own Exception, OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{saved_dir / 'tokenizer.json'}: the run's saved tokenizer does not load ({reason}); "
                        f"remove {saved_dir} to rebuild it from the training data") from None


def tokenizer_from_cache(source: Source, cache: Cache, key: dict, train: Callable[[Source], Any]):
    """A tokenizer trained on a source's rows, built once per cache like token rows."""
    from transformers import AutoTokenizer

    def build(tmp: Path, stage) -> None:
        stage(f"training a tokenizer on {source}")
        train(source).save_pretrained(tmp)

    path, _ = cache.get("tokenizer", {"source": source.fingerprint(), "what": str(source), **key}, build)
    return AutoTokenizer.from_pretrained(path)
