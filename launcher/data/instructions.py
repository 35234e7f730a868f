"""Instruction / chat data for causal-LM fine-tuning: rows -> (input_ids, labels), packing, batching.

Rows in any shape data/prompts.py accepts are rendered to text together with the character
spans the model must learn (the responses, and the end-of-turn marker after each);
tokenization with offsets then marks every token inside a span as a label and every other
token -100. So the loss covers responses only, whatever the template, and the same code
serves our templates and a tokenizer's own chat template.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.config import DataConfig
from launcher.data import prompts
from launcher.data.clauses import read_records
from launcher.data.sources import BadRows
from launcher.data.prompts import PromptFormat
from launcher.errors import DataError
from launcher.files import write_atomically

IGNORE = -100
ROLES = prompts.ROLES
CLOSED_SET_MAX = 50  # at most this many distinct answers make a closed set (eval: accuracy, macro-F1, choices)


def as_format(cfg, tokenizer) -> PromptFormat:
    """A PromptFormat, from itself or from a DataConfig (data.* prompt keys)."""
    return cfg if isinstance(cfg, PromptFormat) else PromptFormat.from_config(cfg, tokenizer)


# ---------------------------------------------------------------- rows


def parse_row(record, where: str, fmt: PromptFormat | None = None) -> dict:
    """A validated row: {"instruction", "input", "output"} or {"messages"}. DataError names file:line."""
    return prompts.normalize(record, fmt or PromptFormat(), where)


def read_rows(path: str | Path, fmt: PromptFormat | None = None, need_answer: bool = True,
              mappable: bool = True) -> list[dict]:
    """A file's rows in a format (an export's for eval: not `mappable`). A file with no column
    of a known shape (a classifier's text and label) is one line for the file, not one per row."""
    rows, bad = [], BadRows(str(path))
    fmt = fmt or PromptFormat()
    columns: dict = {}  # (ordered as the file names them)
    for where, record in read_records(path):
        columns.update(dict.fromkeys(record) if isinstance(record, dict) else {})
        try:
            rows.append(prompts.normalize(record, fmt, where, need_answer))
        except DataError as e:
            bad.add(e.problems)
    if columns and (problems := prompts.column_problems([str(c) for c in columns], fmt, str(path), mappable)):
        raise DataError(*problems)
    bad.check()
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------- rendering


def render(row: dict, cfg, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, trainable character spans) for one row (data/prompts.py decides the text)."""
    return prompts.render(row, as_format(cfg, tokenizer), tokenizer)


def encode(row: dict, cfg, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels copy the ids inside trainable spans and are -100 elsewhere."""
    ids, labels, _ = _encode(row, as_format(cfg, tokenizer), tokenizer)
    return ids, labels


def _encode(row: dict, fmt, tokenizer):
    """encode(), and what reference_row needs to tell which answer a cut leaves last."""
    text, spans, turns = prompts.render_turns(row, fmt, tokenizer)
    (raw, offsets), = prompts.tokenize_at([text], [prompts.answer_cuts(spans, fmt)], tokenizer)
    ids, labels = _with_labels(list(raw), offsets, spans, text, tokenizer)
    return ids, labels, (offsets, len(ids) - len(raw), spans, turns)


def reference_row(row: dict, labels: list[int], where) -> dict:
    """The row whose last answer is the last one `labels` (cut at max_length) still trains: its
    reference answer and question for generation-based evaluation. The answers' prompt is
    everything before the last labelled run (last_answer_start), so a conversation cut before
    its last answer asks for an earlier one, and must be scored against that one, not the lost
    last answer. `where`: (token offsets, tokens added before them (a BOS), spans, turns)."""
    offsets, shift, spans, turns = where
    if "messages" not in row or not spans:
        return row
    if len(spans) == 1:  # (the row as far as it: a later answer of weight 0 is not the one it trains)
        return prompts.through_answer(row, turns[0])
    last = next((j for j in range(len(labels) - 1, -1, -1) if labels[j] != IGNORE), None)
    if last is None or last - shift >= len(offsets):
        return row
    at = offsets[last - shift][0]
    k = next((k for k, (s, e) in enumerate(spans) if s <= at < e), len(spans) - 1)
    return prompts.through_answer(row, turns[k])


def _fit(row: dict | None, ids: list[int], labels: list[int], where, cfg) -> tuple[list, list, dict | None, str]:
    """One encoded row against max_length: (ids, labels, the row as far as the last answer the
    kept labels train (reference_row), and "fits" | "cut" | "drop"). Untrained tokens after the
    last answer (a closing user turn, a template's tail) take part in no loss: when only they
    overflow, they are left out and the row fits (it was dropped or counted as truncated)."""
    if len(ids) > cfg.max_length:
        last = next((i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), -1)
        if 0 <= last < cfg.max_length:
            ids, labels = ids[: last + 1], labels[: last + 1]
    if len(ids) <= cfg.max_length:  # (as far as its last trained answer: a later one of weight 0 is context)
        turns = where[3]
        return ids, labels, prompts.through_answer(row, turns[-1]) if row and turns else row, "fits"
    if cfg.truncation == "drop":
        return ids, labels, row, "drop"
    ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
    return ids, labels, reference_row(row, labels, where) if row else row, "cut"


def _with_labels(ids: list[int], offsets, spans, text: str, tokenizer) -> tuple[list[int], list[int]]:
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        # A token is learned when it lies inside an answer's span; one with no characters of its
        # own (some SentencePiece markers) when it starts inside one: the model must produce it.
        inside = any(s <= a and b <= e for s, e in spans) if b > a else any(s <= a < e for s, e in spans)
        labels.append(tok if inside else IGNORE)
    with_bos = prompts.with_bos(ids, text, tokenizer)
    if len(with_bos) > len(ids):
        ids, labels = with_bos, [IGNORE] + labels
    return ids, labels


def last_answer_start(labels) -> int:
    """Where the last answer starts: the first token of the last run of labelled tokens (its
    prompt is everything before; len(labels) when nothing is labelled)."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i if any(x != IGNORE for x in labels) else len(labels)


class InstructionEncoder:
    """A batch of raw rows -> token rows in one pass of datasets.map: each row checked
    (a bad one gets its message in `_error`), rendered, tokenized with the fast tokenizer's
    batch path, labelled from its spans, and cut or marked for dropping at max_length.
    Beside the tokens it keeps each row's reference answer and question (`answer`, `question`:
    generation-based evaluation scores against them) and its system prompt (`_system`)."""

    def __init__(self, cfg: DataConfig, tokenizer, fmt: PromptFormat | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.fmt = fmt or as_format(cfg, tokenizer)
        self.controls = prompts.control_pattern(tokenizer)

    def check(self, where: str, record) -> None:
        prompts.normalize(record, self.fmt, where)

    def check_columns(self, columns: list[str], source: str) -> list[str]:
        return prompts.column_problems(columns, self.fmt, source)

    def __call__(self, batch: dict) -> dict:
        from launcher.data.pipeline import ROW, records

        texts, spans, errors, rows, controls = [], [], [], [], []
        for record in records(batch):
            try:
                row = prompts.normalize(record, self.fmt, ROW)
                text, span, turn = prompts.render_turns(row, self.fmt, self.tokenizer)
                error = ""
                controls.append(prompts.control_text(prompts.own_words(record, row, self.fmt), self.controls) or "")
            except DataError as e:  # the message names the row (file:line) once the map is done
                problem = e.problems[0]
                row, text, span, turn, error = None, "", [], [], problem if problem.startswith(ROW) else f"{ROW}: {problem}"
                controls.append("")
            rows.append(row)
            texts.append(text)
            spans.append((span, turn))
            errors.append(error)
        encoded = prompts.tokenize_at(texts, [prompts.answer_cuts(span, self.fmt) for span, _ in spans], self.tokenizer)
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "seq_lens", "length", "answer", "question", "_error", "_drop",
                               "_truncated", "_unanswered", "_label_tokens", "_chat", "_system", "_untrained", "_control")}
        for (ids, offsets), (span, turn), text, error, row, control in zip(encoded, spans, texts, errors, rows, controls):
            n_tokens = len(ids)
            ids, labels = _with_labels(list(ids), offsets, span, text, self.tokenizer)
            shift = len(ids) - n_tokens  # a BOS put before the text's tokens
            ids, labels, ref, fit = _fit(row, ids, labels, (offsets, shift, span, turn), self.cfg)
            n_labels = sum(x != IGNORE for x in labels)
            drop = fit == "drop" or n_labels == 0 or bool(error)
            truncated = fit == "cut" and not drop  # a row is counted once: cut and kept, or dropped
            unanswered = fit == "fits" and n_labels == 0 and not error  # (whole, yet nothing in it trains)
            for k, v in (("input_ids", ids), ("labels", labels), ("seq_lens", [len(ids)]), ("length", len(ids)),
                         ("answer", (prompts.answer(ref) or "") if ref else ""),
                         ("question", prompts.question(ref, scored=True) if ref else ""),
                         ("_error", error), ("_drop", drop), ("_truncated", truncated), ("_unanswered", unanswered),
                         ("_label_tokens", n_labels),
                         ("_chat", row is not None and "messages" in row),
                         ("_system", prompts.system_of(row, self.fmt) if row else None),
                         ("_untrained", prompts.untrained_turns(row, span) if row else 0),
                         ("_control", control)):
                out[k].append(v)
        return out

    def finish(self, ds):
        """Counts (as EncodeStats), drops the rows to drop, and packs when asked."""
        import datasets
        import pyarrow.compute as pc

        table = ds.data.table
        drop, truncated = table["_drop"], table["_truncated"]
        keep = pc.invert(drop)
        stats = EncodeStats(rows=table.num_rows, truncated=int(pc.sum(truncated).as_py() or 0),
                            dropped=int(pc.sum(drop).as_py() or 0), chat_rows=int(pc.sum(table["_chat"]).as_py() or 0),
                            unanswered=int(pc.sum(table["_unanswered"]).as_py() or 0))
        kept = table.filter(keep)
        stats.tokens = int(pc.sum(kept["length"]).as_py() or 0)
        stats.label_tokens = int(pc.sum(kept["_label_tokens"]).as_py() or 0)
        stats.untrained_turns = int(pc.sum(kept["_untrained"]).as_py() or 0)
        controls = kept["_control"].filter(pc.not_equal(kept["_control"], ""))
        stats.control_text = len(controls)
        stats.control_token = controls[0].as_py() if len(controls) else None
        if kept.num_rows:
            stats.empty_answers = int(pc.sum(pc.equal(pc.utf8_trim_whitespace(kept["answer"]), "")).as_py() or 0)
            systems = pc.unique(kept["_system"])
            if len(systems) == 1 and systems[0].is_valid:  # every row renders with this system prompt
                stats.system_prompt = systems[0].as_py()
            counts = pc.value_counts(kept["answer"])
            if len(counts) <= CLOSED_SET_MAX:
                stats.answers = {c["values"].as_py(): c["counts"].as_py() for c in counts}
        cap = getattr(self.cfg, "max_rows_per_answer", None)
        if cap:
            kept, stats.capped = cap_answers(kept, cap)
            stats.tokens = int(pc.sum(kept["length"]).as_py() or 0)
            stats.label_tokens = int(pc.sum(kept["_label_tokens"]).as_py() or 0)
        table = kept.drop_columns(["_drop", "_truncated", "_unanswered", "_label_tokens", "_chat", "_system", "_untrained",
                                   "_control"])
        if table.num_rows == 0:
            limit = f"data.max_length {self.cfg.max_length}, data.truncation {self.cfg.truncation}"
            if not stats.unanswered:
                raise DataError(f"no usable rows: all {stats.rows} were dropped ({limit})")
            cut = stats.dropped - stats.unanswered
            raise DataError(f"no usable rows: all {stats.rows} were dropped: " + (f"{cut} by {limit}, " if cut else "")
                            + f"{stats.unanswered} with no answer to learn ({UNANSWERED})")
        if self.cfg.packing:
            table = table.drop_columns(["answer", "question"])
            stats.blocks_greedy = len(greedy_plan(table["length"].to_pylist(), self.cfg.max_length))
            table = pack_table(table, self.cfg.max_length, "bfd")
        return datasets.Dataset(table), stats.__dict__


def cap_answers(table, cap: int):
    """At most `cap` rows per distinct answer, chosen by a fixed-seed shuffle (the same rows in
    every run and on every rank), kept in file order; and {answer: rows left out}."""
    import numpy as np
    import pyarrow as pa

    answers = table["answer"].to_pylist()
    by_answer: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        by_answer.setdefault(a, []).append(i)
    rng = np.random.default_rng(0)
    keep, left_out = [], {}
    for a, rows in by_answer.items():
        if len(rows) > cap:
            left_out[a] = len(rows) - cap
            rows = sorted(rng.permutation(rows)[:cap].tolist())
        keep += rows
    return table.take(pa.array(sorted(keep), pa.int64())), left_out


# ---------------------------------------------------------------- datasets


UNANSWERED = "each assistant turn comes before any user turn: a greeting answers nothing"


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0  # rows cut at max_length and kept
    dropped: int = 0  # too long under truncation=drop, or no response token left after truncating
    tokens: int = 0  # tokens kept (before padding)
    label_tokens: int = 0
    chat_rows: int = 0  # rows given as conversations
    blocks_greedy: int = 0  # packed blocks had rows been packed in order (for comparison)
    system_prompt: str | None = None  # the system prompt every kept row renders with, if they share one
    answers: dict | None = None  # {answer: rows} when at most CLOSED_SET_MAX distinct answers
    capped: dict | None = None  # {answer: rows left out by data.max_rows_per_answer}
    untrained_turns: int = 0  # earlier answers the chat template renders otherwise once later turns follow
    unanswered: int = 0  # of the dropped: whole rows with no answer to learn (an opening assistant turn alone)
    empty_answers: int = 0  # kept rows whose (last) answer is empty: they teach the turn's end alone
    control_text: int = 0  # kept rows whose own words hold a special token's text (prompts.control_text)
    control_token: str | None = None  # the first such token, in row order

    def examples(self) -> int:
        """Rows that train (packed or not): those read, less the dropped and the capped."""
        return self.rows - self.dropped - sum((self.capped or {}).values())

    def line(self, split: str) -> str:
        unanswered = f", {self.unanswered} with no answer to learn ({UNANSWERED})" if self.unanswered else ""
        return (f"{split}: {self.rows} rows, {self.truncated} truncated, {self.dropped - self.unanswered} dropped "
                f"(data.truncation){unanswered}, {self.tokens:,} tokens, {self.label_tokens:,} in responses"
                + (f"; {self.untrained_turns} earlier assistant turns kept as context, untrained: the chat template "
                   "renders them otherwise once later turns follow (Qwen3's <think> blocks)" if self.untrained_turns else ""))


def encode_rows(rows: list[dict], cfg: DataConfig, tokenizer, fmt: PromptFormat | None = None,
                kept: list | None = None) -> tuple[list, list, EncodeStats]:
    """Token rows of parsed rows, one process (`launcher eval`, tests); `kept` collects the rows
    that survive max_length, in order, each as far as the last answer a cut left (reference_row)."""
    stats = EncodeStats()
    all_ids, all_labels = [], []
    fmt = fmt or as_format(cfg, tokenizer)
    for row in rows:
        stats.rows += 1
        ids, labels, where = _encode(row, fmt, tokenizer)
        ids, labels, ref, fit = _fit(row, ids, labels, where, cfg)
        if fit == "drop":
            stats.dropped += 1
            continue
        if all(x == IGNORE for x in labels):
            stats.dropped += 1
            stats.unanswered += fit == "fits"
            continue
        stats.truncated += fit == "cut"  # cut and kept (a row cut past its answer is dropped)
        all_ids.append(ids)
        all_labels.append(labels)
        if kept is not None:
            kept.append(ref)
        stats.tokens += len(ids)
        stats.label_tokens += sum(x != IGNORE for x in labels)
    return all_ids, all_labels, stats


def pack(ids: list[list[int]], labels: list[list[int]], block: int) -> tuple[list, list, list]:
    """Greedy, in order: examples are appended to the current block until the next does not fit.
    No example is split, so every example keeps all its tokens."""
    out_ids: list[list[int]] = []
    out_labels: list[list[int]] = []
    out_lens: list[list[int]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_lens: list[int] = []
    for x, y in zip(ids, labels):
        if cur_ids and len(cur_ids) + len(x) > block:
            out_ids.append(cur_ids)
            out_labels.append(cur_labels)
            out_lens.append(cur_lens)
            cur_ids, cur_labels, cur_lens = [], [], []
        cur_ids, cur_labels, cur_lens = cur_ids + x, cur_labels + y, cur_lens + [len(x)]
    if cur_ids:
        out_ids.append(cur_ids)
        out_labels.append(cur_labels)
        out_lens.append(cur_lens)
    return out_ids, out_labels, out_lens


def greedy_plan(lengths: list[int], block: int) -> list[list[int]]:
    """Blocks of `pack`: rows in order, a new block when the next row does not fit."""
    plan: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not plan or used + n > block:
            plan.append([])
            used = 0
        plan[-1].append(i)
        used += n
    return plan


def bfd_plan(lengths: list[int], block: int) -> list[list[int]]:
    """Best-fit decreasing: longest rows first, each into the open block it fills most
    tightly (the least room left that still fits), a new block when none fits. Fewer,
    fuller blocks than packing in order. The open blocks are indexed by room left in a
    Fenwick tree, so each placement costs O(log block): 200k rows take about a second."""
    size = block + 1
    tree = [0] * (size + 1)  # counts of open blocks by room left (0..block), 1-based

    def add(room: int, delta: int) -> None:
        i = room + 1
        while i <= size:
            tree[i] += delta
            i += i & -i

    def prefix(room: int) -> int:  # open blocks with room <= `room`
        i, total = room + 1, 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def kth(k: int) -> int:  # the room of the k-th open block by room (1-based k)
        pos, step = 0, 1 << size.bit_length()
        while step:
            if pos + step <= size and tree[pos + step] < k:
                pos += step
                k -= tree[pos]
            step >>= 1
        return pos  # == room (pos + 1 is the 1-based index)

    by_room: dict[int, list[int]] = {}
    plan: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        below = prefix(n - 1) if n > 0 else 0
        if prefix(block) > below:
            room = kth(below + 1)
            b = by_room[room].pop()
            add(room, -1)
        else:
            room, b = block, len(plan)
            plan.append([])
        plan[b].append(i)
        by_room.setdefault(room - n, []).append(b)
        add(room - n, 1)
    return plan


def pack_table(table, block: int, strategy: str = "bfd"):
    """Packed rows from a table of examples, built from Arrow offsets without turning token
    lists into Python objects: `strategy` bfd (best-fit decreasing) or greedy (in order, as
    `pack`). Columns: input_ids, labels, seq_lens, length."""
    import numpy as np
    import pyarrow as pa

    lengths = table["length"].to_numpy()
    plan = (bfd_plan if strategy == "bfd" else greedy_plan)(lengths.tolist(), block)
    order = np.fromiter((i for rows in plan for i in rows), dtype=np.int64, count=len(lengths))
    table = table.take(pa.array(order))
    lengths = lengths[order]
    bounds = np.concatenate([[0], np.cumsum([len(rows) for rows in plan], dtype=np.int64)])
    token_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])[bounds]

    def regroup(column):
        values = column.combine_chunks().flatten()
        return pa.LargeListArray.from_arrays(pa.array(token_offsets, pa.int64()), values)

    return pa.table({
        "input_ids": regroup(table["input_ids"]),
        "labels": regroup(table["labels"]),
        "seq_lens": pa.LargeListArray.from_arrays(pa.array(bounds, pa.int64()), pa.array(lengths, pa.int64())),
        "length": pa.array(np.diff(token_offsets), pa.int64()),
    })


def response_items(ds, tokens_per_block: int = 1 << 24):
    """Per row of a split (a `datasets.Dataset` with labels and seq_lens): the tokens the loss
    predicts once LMCollator has batched the row, as CausalLMTask.loss_items counts them:
    labels that are not IGNORE, except each example's first token (nothing of its own example
    precedes it; in a packed row the collator masks it, in a row of one example the shift by
    one drops it). Vectorised over Arrow offsets, a block of about `tokens_per_block` tokens
    at a time (a few hundred MB of host memory whatever the row length); int64."""
    import numpy as np
    import pyarrow.compute as pc

    longest = max(1, pc.max(pc.list_value_length(ds.data.column("labels"))).as_py() or 1)
    out = [np.zeros(0, dtype=np.int64)]
    for table in ds.with_format("arrow").iter(batch_size=max(1, tokens_per_block // longest)):
        labels, seq_lens = table["labels"].combine_chunks(), table["seq_lens"].combine_chunks()
        offsets = labels.offsets.to_numpy()
        offsets = offsets - offsets[0]  # a slice of a longer array keeps its parent's offsets
        target = labels.flatten().to_numpy(zero_copy_only=False) != IGNORE
        lengths = seq_lens.flatten().to_numpy(zero_copy_only=False)
        starts = np.cumsum(lengths) - lengths  # every example's first token; a row's examples fill it
        target[starts[lengths > 0]] = False
        running = np.concatenate([[0], np.cumsum(target, dtype=np.int64)])
        out.append(running[offsets[1:]] - running[offsets[:-1]])
    return np.concatenate(out)


class LMCollator:
    """Pads to the longest row. Unpacked rows get a 2-D attention mask. Packed rows get no
    mask at all, only position ids that restart at 0 for every example (and for the padding
    at the end): the model finds the example boundaries from them (transformers' packed-
    sequence detection: a block-diagonal causal mask under sdpa/eager), so nothing of size
    L x L is built here and no float mask can disagree with the model's dtype.

    Under flash attention that detection only works for a batch of one row (with more, its
    kernel gets no mask and every example attends to those packed before it), so `flatten`
    joins the micro-batch's rows into one padding-free row and passes the boundaries
    themselves: cu_seq_lens_q/k (int32 offsets of every example) and max_length_q/k, the
    varlen kernel's arguments, as transformers' DataCollatorWithFlattening emits them. (That
    collator takes unpacked examples; these rows arrive packed, with their lengths.)

    In packed rows an example's first token is never a target (as in a row of its own, where
    nothing precedes it): the previous example's last token must not learn to predict it."""

    def __init__(self, pad_id: int, packed: bool, flatten: bool = False):
        self.pad_id, self.packed, self.flatten = pad_id, packed, flatten and packed

    def __call__(self, rows: list[dict]) -> dict:
        if self.flatten:
            rows = [{"input_ids": [t for r in rows for t in r["input_ids"]],
                     "labels": [t for r in rows for t in r["labels"]],
                     "seq_lens": [n for r in rows for n in r["seq_lens"]]}]
        width = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        batch: dict[str, torch.Tensor | int] = {"input_ids": ids, "labels": labels}
        if not self.packed:
            batch["attention_mask"] = mask
            return batch
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            start = 0
            for length in list(r["seq_lens"]) + [width - sum(r["seq_lens"])]:
                positions[i, start : start + length] = torch.arange(int(length))
                if length:
                    labels[i, start] = IGNORE
                start += length
        batch["position_ids"] = positions
        if self.flatten:
            lens = rows[0]["seq_lens"]
            offsets = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = offsets
            batch["max_length_q"] = batch["max_length_k"] = int(max(lens))
        return batch


# ---------------------------------------------------------------- synthetic


_WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lumen", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
          "willow", "xenon", "yarrow", "zephyr"]


def generate_instructions(n: int, seed: int) -> list[dict]:
    """A memorisable mapping: 'What is the code word for <thing>?' -> a fixed answer per thing.

    A few distinct things repeat many times, so a tiny model can learn every answer;
    a tenth of the rows are chat-formatted to exercise both formats."""
    rng = random.Random(seed)
    vocab = random.Random(0)  # the mapping itself is fixed, so train and validation agree
    things = [f"{a} {b}" for a, b in zip(_WORDS, reversed(_WORDS))][:8]
    answers = {t: " ".join(vocab.sample(_WORDS, 2)) for t in things}
    rows: list[dict] = []
    for i in range(n):
        thing = rng.choice(things)
        question = f"What is the code word for {thing}?"
        if i % 10 == 9:
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answers[thing]}]})
        else:
            rows.append({"instruction": question, "input": "", "output": answers[thing]})
    return rows


def write_instruction_splits(out_dir: str | Path, n_train: int, n_validation: int, seed: int) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "validation.jsonl"
    for path, rows in zip(paths, (generate_instructions(n_train, seed), generate_instructions(n_validation, seed + 1))):
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    return paths
