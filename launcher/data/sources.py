"""Where a split's rows come from, and reading them into Arrow through `datasets`.

A split is one of:
- a local file (`.jsonl`/`.json`, `.csv`, `.parquet`), read by `datasets`' own loaders;
- a directory written by `Dataset.save_to_disk` (a `DatasetDict` directory picks the split
  by name), memory-mapped as it is;
- a hub dataset id (`data.hub_dataset`, `data.hub_config`, split name), or a local dataset
  directory standing in for one (a folder of data files, as on the hub).

`Source` is cheap to build on every rank: it only looks at paths, sizes and mtimes. Reading
rows (`read`) is done by the one process that builds the token cache (data/cache.py).
A row that is wrong is reported as `file:line` (JSONL, CSV), `file: row N` (Parquet,
Arrow directories) or `dataset/config:split: row N` (hub): `locate` maps row indices back to
lines by rescanning the file, which happens only when there is something to report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from launcher.errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_REPORTED = 10  # a file with thousands of bad rows gets the first few, then a count


class BadRows:
    """A file's bad rows as every command reports them: the problems of the first MAX_REPORTED
    rows, then one line counting the rows not shown (a row may have several problems)."""

    def __init__(self, source: str):
        self.source, self.rows = source, 0
        self.shown: list[str] = []

    def add(self, problems: list[str]) -> None:
        self.rows += 1
        if self.rows <= MAX_REPORTED:
            self.shown.extend(problems)

    def lines(self) -> list[str]:
        hidden = self.rows - MAX_REPORTED
        return self.shown + ([f"{self.source}: {hidden} more bad rows not shown"] if hidden > 0 else [])

    def check(self) -> None:
        if self.rows:
            raise DataError(*self.lines())


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


_SPECIAL = re.compile(r"[][*?${}]")  # what datasets.load_dataset expands in a path it is given


def _as_named(path: Path, cache_dir: Path) -> str:
    """The file as datasets.load_dataset reads a name: it expands $VARS in it and takes [ ] * ?
    as a glob pattern, so a file under `d[1]/` or `e$HOME/` did not load (a 'cannot be read'
    line about a good file, or another file's name). Such a path is read through a link of a
    plain name in the data cache (written beside it and renamed into place: ranks and jobs
    sharing the cache may make it at once); where the cache's own path has such characters (an
    output directory `runs[1]`), in the temporary directory."""
    import secrets
    import tempfile

    text = str(path.absolute())
    if not _SPECIAL.search(text):
        return text
    links = cache_dir.absolute() / "links"
    try:
        if _SPECIAL.search(str(links)):  # this user's own folder (another user could make one of that name first)
            links = Path(tempfile.gettempdir()) / f"launcher-{os.getuid()}-links"
            links.mkdir(mode=0o700, exist_ok=True)
            if links.stat().st_uid != os.getuid():
                links = Path(tempfile.mkdtemp(prefix="launcher-links-"))
        else:
            links.mkdir(parents=True, exist_ok=True)
        link = links / (hashlib.sha256(text.encode()).hexdigest()[:20] + path.suffix.lower())
        tmp = links / f".{link.name}.{secrets.token_hex(8)}"  # (not a pid: nodes sharing the cache repeat them)
        os.symlink(text, tmp)
        os.replace(tmp, link)
    except OSError:  # no links here (some FUSE and CIFS mounts): read by its name, as before
        return text
    return str(link)


@dataclass(frozen=True)
class Source:
    kind: str  # file | saved | hub
    name: str  # path, or hub id / local dataset directory
    split: str
    field: str  # the config key that named it, for messages
    config: str | None = None  # hub config

    @property
    def fmt(self) -> str | None:
        return FORMATS.get(Path(self.name).suffix.lower()) if self.kind == "file" else None

    def __str__(self) -> str:
        if self.kind == "hub":
            local = Path(self.name).expanduser()
            if local.is_dir():  # a local folder standing in for a hub id: its config's subfolder when it has one
                shown = local / self.config if self.config and (local / self.config).is_dir() else local
                return f"{shown}:{self.split}"
            return f"{self.name}/{self.config}:{self.split}" if self.config else f"{self.name}:{self.split}"
        if self.kind == "saved":
            return f"{self.name}:{self.split}" if (Path(self.name) / "dataset_dict.json").is_file() else self.name
        return self.name

    def fingerprint(self) -> str:
        """Cheap identity of the rows: path, size and mtime of every file behind them (never
        their contents). A hub id is its name, config and split: datasets' own cache versions it."""
        parts = [self.kind, self.name, self.split, self.config or ""]
        if self.kind == "hub" and Path(self.name).expanduser().is_dir():
            parts.append("csv cells as text")  # (2026-12: tokens read with pandas' guesses are not these)
        path = Path(self.name)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for f in files:
            st = f.stat()
            parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    # ---- reading

    def read(self, cache_dir: Path, check: Callable[[str, dict], None] | None = None):
        """The rows as a `datasets.Dataset` (raw columns). DataError with one line per problem.

        When the fast reader refuses a JSONL or CSV file (a line that is not JSON, bytes that
        are not UTF-8, ...), the file is read again line by line and every problem is
        reported in line order, including the rows that `check(where, record)` rejects."""
        import datasets

        datasets.disable_progress_bars()
        if self.kind == "saved":
            return _load_saved(Path(self.name), self.split, self.field)
        if self.kind == "hub":
            return _load_hub(self, cache_dir)
        path = Path(self.name)
        try:
            if self.fmt == "csv":
                with open(path, encoding="utf-8", newline="") as f:
                    reader = csv.reader(f)
                    header = next(reader, None)
                    first = next((r for r in reader if r), None)  # a header alone: no rows either
                if not header or first is None:
                    raise DataError(f"{path}: no rows")
                # Every cell as text, empty cells as "": what the row checks expect (a "0" label
                # and an empty `labels` cell), not pandas' guesses (0.0, NaN).
                return datasets.load_dataset("csv", data_files=_as_named(path, cache_dir), split="train", cache_dir=str(cache_dir),
                                             converters={c: str for c in header}, keep_default_na=False, na_filter=False)
            if path.suffix.lower() in (".jsonl", ".json"):
                _check_json(path)
            ds = datasets.load_dataset(self.fmt, data_files=_as_named(path, cache_dir), split="train", cache_dir=str(cache_dir))
            # pyarrow's JSON reader keeps bytes that are not UTF-8 as they are; a full validation
            # finds them now (one C++ pass) rather than as a decode error in the middle of a map.
            ds.data.table.validate(full=True)
            return ds
        except DataError:
            raise
        except Exception as e:  # pyarrow / pandas raise many types for a malformed file
            problems = _why_unreadable(path, self.fmt, e, check)
            if problems or self.fmt != "json" or _starts_with(path, b"["):
                raise DataError(*(problems or [_cannot_read(path, self.fmt, e)])) from None
            # Every row good by our reading: datasets' own reader fails on JSON lines whose
            # column changes type (int labels, then names) when the file also has a blank line
            # or a byte-order mark (its fallback parses each line without skipping them;
            # datasets 5.2). Read a copy of the rows alone, made once in the data cache.
            try:
                copy = _rows_alone(path, cache_dir)
            except OSError:  # (a full disk, a cache this user cannot write): what the reader said
                copy = None
            if copy is None:
                raise DataError(_cannot_read(path, self.fmt, e)) from None
            try:
                return datasets.load_dataset("json", data_files=_as_named(copy, cache_dir), split="train",
                                             cache_dir=str(cache_dir))
            except Exception as again:  # noqa: BLE001 - a reader failure of its own: said as before
                raise DataError(_cannot_read(path, self.fmt, again)) from None

    @property
    def json_lines(self) -> bool:
        """A .jsonl whose rows are its non-blank lines (a .jsonl holding one array is not)."""
        path = Path(self.name)
        return self.kind == "file" and path.suffix.lower() == ".jsonl" and not _starts_with(path, b"[")

    def locate(self, indices: list[int]) -> dict[int, str]:
        """'file:line' (or 'file: row N') for 0-based row indices."""
        wanted = set(indices)
        if self.json_lines:
            out, row = {}, 0
            with open(self.name, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if row in wanted:
                        out[row] = f"{self.name}:{lineno}"
                        if len(out) == len(wanted):
                            break
                    row += 1
            return {i: out.get(i, f"{self.name}: row {i + 1}") for i in indices}
        if self.kind == "file" and self.fmt == "csv":
            out = {}
            with open(self.name, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                next(reader, None)
                # Blank lines are no rows to the fast reader (nor to DictReader): counted, every
                # line after one was named one line too early.
                for row, _ in enumerate(r for r in reader if r):
                    if row in wanted:
                        out[row] = f"{self.name}:{reader.line_num}"
                        if len(out) == len(wanted):
                            break
            return {i: out.get(i, f"{self.name}: row {i + 1}") for i in indices}
        return {i: f"{self}: row {i + 1}" for i in indices}

    def count_rows(self) -> int | None:
        """Rows without parsing them where that is cheap (JSONL lines, Parquet metadata)."""
        path = Path(self.name)
        if self.json_lines:
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if self.kind == "file" and self.fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(path).metadata.num_rows
            except Exception:
                return None
        if self.kind == "saved":
            try:
                return _load_saved(path, self.split, self.field).num_rows
            except DataError:
                return None
        return None


def resolve(data_cfg, split: str) -> Source:
    """The source of split 'train' or 'validation' from the data config (no rows read)."""
    field = f"data.{split}_file"
    path = getattr(data_cfg, f"{split}_file")
    split_name = getattr(data_cfg, f"{split}_split")
    if path is not None:
        p = Path(path)
        if p.is_dir():
            if not is_saved_dataset(p):
                raise DataError(f"{field}: {path}: a directory, but not one written by Dataset.save_to_disk "
                                "(for a folder of data files use data.hub_dataset=DIR)")
            return Source("saved", str(p), split_name, field)
        if not p.is_file():
            from launcher.config import from_here

            raise DataError(f"{field}: {path}: file not found" + from_here(path))
        if p.suffix.lower() not in FORMATS:
            raise DataError(f"{field}: {path}: unsupported format (use .jsonl, .csv, .parquet or a save_to_disk directory)")
        return Source("file", str(p), split_name, field)
    return Source("hub", data_cfg.hub_dataset, split_name, "data.hub_dataset", data_cfg.hub_config)


def _load_saved(path: Path, split: str, field: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{field}: {path}: cannot be read as a save_to_disk directory ({_first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{field}: {path} has splits {', '.join(loaded)}; none is named '{split}' "
                            f"(set data.train_split / data.validation_split)")
        return loaded[split]
    return loaded


def _load_hub(src: Source, cache_dir: Path):
    import datasets

    local = Path(src.name).expanduser()
    if local.is_dir():
        # A local dataset directory standing in for a hub id: its data files, split by file
        # name as on the hub; a subdirectory named like the config holds that config's files.
        data_dir = local / src.config if src.config and (local / src.config).is_dir() else local
        odd = sorted(set(re.findall(r"[][*?$]", str(data_dir.resolve()))))  # ({ } read as themselves here)
        if odd:  # (datasets resolves the folder's links first: _as_named cannot help here)
            raise DataError(f"data.hub_dataset: {src.name}: datasets reads a folder's path as a pattern, where "
                            f"{' '.join(odd)} of {data_dir.resolve()} are special (a folder `s*` read the files of sX "
                            "beside it too); rename the folder, or give its files as data.train_file and "
                            "data.validation_file")
        try:
            return datasets.load_dataset(str(data_dir), split=src.split, cache_dir=str(cache_dir), **_csv_options(data_dir))
        except ValueError as e:
            raise DataError(f"data.hub_dataset: {src.name}: no split '{src.split}' ({_first_line(e)}); "
                            "set data.train_split / data.validation_split") from None
        except Exception as e:
            raise DataError(f"data.hub_dataset: {src.name}: cannot be read as a dataset directory ({_first_line(e)})") from None
    hint = (
        f"data.hub_dataset: cannot load {src.name} ({src.config}, split {src.split}) from the Hugging Face Hub "
        "(no network, or not cached); download it where you have access and pass local files: "
        "data.train_file=train.jsonl data.validation_file=validation.jsonl (or a save_to_disk directory)"
    )
    try:
        return datasets.load_dataset(src.name, src.config, split=src.split, cache_dir=str(cache_dir))
    except Exception as e:  # the hub client raises many types for "unreachable"
        raise DataError(f"{hint} [{type(e).__name__}]") from None


def _csv_options(data_dir: Path) -> dict:
    """A folder of CSV files read as data.train_file reads one: every cell as text, an empty
    cell as "" (an empty `labels` cell is a fair clause), not pandas' guesses (NaN, 0.0)."""
    files = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in (".csv", ".json", ".jsonl", ".parquet")]
    if not files or any(p.suffix.lower() != ".csv" for p in files):
        return {}
    header: list[str] = []
    for path in files:  # (the union: a shard may name its columns in another order)
        with open(path, encoding="utf-8-sig", newline="") as f:
            header += [c for c in next(csv.reader(f), []) if c not in header]
    return {"converters": {c: str for c in header}, "keep_default_na": False, "na_filter": False}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# A line that starts with anything but an object: `null` first in a file (or in one of
# datasets' 10 MB blocks) crashed pyarrow's JSON reader in C++, a segfault with no message.
_NOT_AN_OBJECT = re.compile(rb"^(?!\xef\xbb\xbf[ \t\r]*\{)(?:\xef\xbb\xbf)?[ \t\r]*[^{ \t\r\n]", re.MULTILINE)  # a BOM is no row


def _check_json(path: Path) -> None:
    """Before the fast reader sees it: a file that is one JSON array or document passes; JSON
    lines (a .jsonl, or a .json whose first line is a whole object) must start an object on
    every non-blank line, or DataError at the first that does not (one regex pass over the
    mapped file: about 0.5 s per 100 MB)."""
    import mmap

    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _refuse_utf16(path, bytes(buf[:4]))
            head = bytes(buf[: 1 << 16]).lstrip(b"\xef\xbb\xbf \t\r\n")
            if head[:1] == b"[":
                return  # one JSON array (a .jsonl that is not, too): the reader takes it as a document
            first = head.splitlines()[0] if head else b""
            if path.suffix.lower() == ".json":
                if head and head[:1] != b"{":
                    got = first[:40].decode("utf-8", "replace")
                    raise DataError(f"{path}: expected a JSON object or array first; got {got!r}")
                _one_object(path)  # (an object of columns read as one row of lists: "no 'text' text in its first rows")
                try:
                    if not isinstance(json.loads(first), dict):
                        return
                except ValueError:
                    return  # one document over many lines
            found = _NOT_AN_OBJECT.search(buf)
            if found is not None:
                line = buf[: found.start()].count(b"\n") + 1
                end = buf.find(b"\n", found.start())
                text = bytes(buf[found.start(): end if end >= 0 else len(buf)])[:40].decode("utf-8", "replace").strip().lstrip("\ufeff")
                raise DataError(f"{path}:{line}: expected a JSON object ({{...}}) on each line; got {text!r}")


def _why_unreadable(path: Path, fmt: str | None, error: BaseException, check) -> list[str]:
    """Every problem of a file the fast reader refused (first MAX_REPORTED, then a count), or
    `no rows` for a file without any (empty, blank lines, `[]`); none when every row is good
    by this reading (and `check`)."""
    if fmt == "parquet":
        return [f"{path}: not a readable Parquet file ({_first_line(error)})"]
    bad = BadRows(str(path))
    rows = 0
    for where, record in read_records(path):
        rows += 1
        try:
            if isinstance(record, DataError):
                raise record
            if check is not None:
                check(where, record)
        except DataError as e:
            bad.add(e.problems)
    if bad.rows:
        return bad.lines()
    return [] if rows else [f"{path}: no rows"]


def _cannot_read(path: Path, fmt: str | None, error: BaseException) -> str:
    what = {"json": "JSON lines", "csv": "CSV"}.get(fmt or "", "data")
    return f"{path}: cannot be read as {what} ({_first_line(error)})"


_BLANK_LINE = re.compile(rb"(?:^|\n)[ \t\r]*(?:\n|$)(?!\Z)|\n[ \t\r]+\Z")  # (a final newline is none)


def _rows_alone(path: Path, cache_dir: Path) -> Path | None:
    """A copy of a JSON-lines file without its blank lines and byte-order mark, in the data
    cache under the file's identity (path, size, mtime: a file changed since gets another);
    None when the file has neither (the copy would be the file). Written beside and renamed
    into place: ranks and jobs sharing the cache may make it at once."""
    import mmap
    import secrets

    if path.stat().st_size == 0:  # (mmap refuses it; no rows, said before this)
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:3] != b"\xef\xbb\xbf" and _BLANK_LINE.search(buf) is None:
            return None  # nothing to leave out: a copy would be the file (one regex pass, no write)
    st = path.stat()
    named = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    copy = cache_dir / "rows-alone" / f"{named}-{key}.jsonl"
    if copy.is_file():
        return copy
    cache_dir.mkdir(parents=True, exist_ok=True)
    mode = cache_dir.stat().st_mode & 0o7777  # the cache's own (a group-shared one's group bits)
    try:
        copy.parent.mkdir()
        os.chmod(copy.parent, mode)  # (by its maker only: another member of a shared cache may not)
    except FileExistsError:
        pass
    tmp = copy.with_name(f".{copy.name}.{secrets.token_hex(8)}")
    dropped = False
    try:
        with open(path, "rb") as src, open(tmp, "wb") as out:
            for lineno, line in enumerate(src, 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line, dropped = line[3:], True
                if not line.strip():
                    dropped = True
                    continue
                out.write(line if line.endswith(b"\n") else line + b"\n")
        if not dropped:
            return None
        os.chmod(tmp, mode & 0o666)
        os.replace(tmp, copy)
        for older in copy.parent.glob(f"{named}-*.jsonl"):  # the same file's copies from before it changed
            if older != copy:
                older.unlink(missing_ok=True)
        return copy
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_utf16(path: Path, first: bytes) -> None:
    """A file in UTF-16 (Windows' "Unicode"; a NUL byte among its first four) is one line, not
    every line's "expected a JSON object" or "not valid JSON". No JSON text holds a raw NUL."""
    if first[:2] == b"\x1f\x8b":  # (its header has NUL bytes too: it read as UTF-16)
        raise DataError(f"{path}:1: gzip-compressed, not text; decompress it first (gunzip)")
    if first[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in first[:4]:
        raise DataError(f"{path}:1: not UTF-8 text (NUL bytes first: UTF-16?); save it as UTF-8")


def _unique_keys(pairs: list) -> dict:
    """json.loads' object hook: a key given twice in one object is an error. json.loads keeps
    the last silently (eval read the second "text" of such a line), and training's reader
    refused the whole file without naming the line."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise ValueError(f"duplicate key {key!r}")
        record[key] = value
    return record


def _starts_with(path: Path, token: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(token)


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for i, record in enumerate(rows, 1):
        yield f"{path}: row {i}", record


def _one_object(path: Path) -> dict | None:
    """A .json file that is one JSON object (pretty-printed over several lines, or on one), or
    None (JSON lines, or anything the line reader names line by line); an object of columns
    (lists of one length) is a DataError."""
    try:
        if path.stat().st_size > 64 << 20:  # (a row is not that long: JSON lines, read line by line)
            return None
        text = path.read_text(encoding="utf-8-sig")
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except (OSError, ValueError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return None
    if not isinstance(document, dict):
        return None
    columns = [list(v.values()) if isinstance(v, dict) else v for v in document.values()]  # (pandas' to_json(): {"text": {"0": ..}})
    lengths = {len(v) if isinstance(v, list) else -1 for v in columns}
    keyed = {tuple(v) for v in document.values() if isinstance(v, dict)}  # a column's row keys: one set for every column
    cells = [x for v in columns if isinstance(v, list) for x in v]
    if len(document) > 1 and len(lengths) == 1 and min(lengths) > 1 and len(keyed) <= 1 \
            and not any(isinstance(x, (dict, list)) for x in cells):  # (a conversation's turns are objects)
        # pandas' to_json() and a dict of lists (to_dict("list")): its "text" was "missing"
        raise DataError(f"{path}: one JSON object of columns ({', '.join(map(repr, document))}: lists of "
                        f"{min(lengths)}); give rows: one JSON object per line (.jsonl) or a JSON array of objects")
    return document


def _header_as_training_reads_it(path: Path, names) -> list[str]:
    """A CSV header's names as pandas (training's reader, through datasets) takes them: a
    repeated name's later copies renamed (text, text.1; csv.DictReader kept the last copy's
    values under one name), an empty one "Unnamed: N". Asked of pandas itself: its renaming
    steps past names the header already has (text,text,text.1 is text, text.2, text.1)."""
    if len(set(names)) == len(names) and all(names):
        return list(names)
    import pandas as pd

    try:
        columns = [str(c) for c in pd.read_csv(path, nrows=0, encoding="utf-8-sig", dtype=str).columns]
    except Exception:  # noqa: BLE001 - the rows' reader says what is wrong with the file
        return list(names)
    return columns if len(columns) == len(names) else list(names)


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    """read_records for a CSV file: every cell as text, under the header's names as training
    reads them; a row of too many fields, bytes that are not UTF-8 or broken CSV as a DataError."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM would have named the first column "\ufefftext"
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames:  # a repeated column's later copies renamed "text.1", as training's reader does
                reader.fieldnames = _header_as_training_reads_it(path, reader.fieldnames)
            for record in reader:
                if None in record.values():  # fewer fields than the header: DictReader filled the rest with None
                    record = ShortRow(record, fields=sum(v is not None for v in record.values()),
                                      named=len(reader.fieldnames or []))
                if None in record:  # (DictReader keeps the extra fields under None; training refuses the row)
                    n = len(reader.fieldnames or []) + len(record[None])
                    cells = [v for v in [*record.values(), *record[None]] if isinstance(v, str)]
                    inside = sum(v.count("\n") for v in cells)  # a quoted cell over several lines
                    opened = (f" (this row runs from line {reader.line_num - inside}: a quote left open there?)"
                              if inside else "")
                    yield f"{path}:{reader.line_num}", DataError(
                        f"{path}:{reader.line_num}: {n} fields where the header names {len(reader.fieldnames or [])}"
                        + opened)
                    continue
                yield f"{path}:{reader.line_num}", record
        except UnicodeDecodeError:  # (decoded a block at a time: the reader's line number was the block's)
            where, byte = _first_bad_byte(path)
            yield where, DataError(f"{where}: not valid UTF-8 (byte {byte} of the line)")
        except csv.Error as e:
            yield f"{path}:{reader.line_num}", DataError(f"{path}:{reader.line_num}: not valid CSV ({e})")


class ShortRow(dict):
    """A CSV row with fewer fields than its header, the missing ones None (training's reader
    fills them with NaN): read as it is; where it lacks a value that is needed, it is named as
    short (`problem`), not as a null label or a missing column."""

    def __init__(self, record: dict, fields: int, named: int):
        super().__init__(record)
        self.fields, self.named = fields, named

    def problem(self, where: str) -> str:
        return f"{where}: {self.fields} field{'s' if self.fields != 1 else ''} where the header names {self.named}"


def _first_bad_byte(path: Path, block: int = 1 << 20) -> tuple[str, int]:
    """`file:line` of a file's first byte that is not UTF-8, and its place in that line (1-based);
    read a block at a time (a training CSV the fast reader refused may be many GB)."""
    line, line_start, base, carry = 1, 0, 0, b""  # base: the file offset of data[0]
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = carry + chunk
            if not data:
                break
            try:
                data.decode("utf-8")
                good, carry, bad = data, b"", None
            except UnicodeDecodeError as e:
                good, bad = data[: e.start], e.start
                if chunk and e.reason == "unexpected end of data":  # a character cut by the block's end
                    carry, bad = data[e.start:], None
            newline = good.rfind(b"\n")
            line += good.count(b"\n")
            line_start = base + newline + 1 if newline >= 0 else line_start
            if bad is not None:
                return f"{path}:{line}", base + bad - line_start + 1
            base += len(good)
            if not chunk:
                break
    return f"{path}:1", 1  # (not reached: the reader failed on some byte)


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) with where = 'file:line' for every row of a local file, read in Python.
    For small files (eval, predict) and for diagnosing files the fast reader refuses: a
    line that is not UTF-8 or not JSON is yielded as a DataError in place of its record."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl") and _starts_with(path, b"["):  # one JSON array, as training's reader takes it
        yield from _json_array(path)
    elif suffix == ".json" and (document := _one_object(path)) is not None:  # one object over several lines: one row,
        yield f"{path}:1", document  # as training's reader takes it (it was a "not valid JSON" per line)
    elif suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            _refuse_utf16(path, f.read(4))
            f.seek(0)
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    # utf-8-sig: a byte-order mark (Windows editors, Excel) begins the first line;
                    # the fast reader training uses skips it, json.loads refused it.
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield where, DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, object_pairs_hook=_unique_keys)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: not valid JSON ({e.msg})")
                except ValueError as e:  # _unique_keys
                    yield where, DataError(f"{where}: {e}")
                else:
                    yield where, record
    elif suffix == ".csv":
        yield from _csv_records(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
        for i, record in enumerate(table.to_pylist(), 1):
            yield f"{path}: row {i}", record
    else:
        raise DataError(f"{path}: unsupported format (use .jsonl, .csv or .parquet)")
