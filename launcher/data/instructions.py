"""Instruction / chat data for causal-LM fine-tuning: rows -> (input_ids, labels), packing, batching.

A row is either `{"instruction", "input"?, "output"}` or `{"messages": [{"role", "content"}, ...]}`
(roles system / user / assistant). Each row is rendered to text together with the
character spans the model must learn (the responses, and the end-of-sequence token
after each); tokenization with offsets then marks every token inside a span as a
label and every other token -100. So the loss covers responses only, whatever the
template, and the same code serves our templates and a tokenizer's own chat template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.config import DataConfig
from launcher.data.clauses import MAX_REPORTED, read_records
from launcher.errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------- rows


def parse_row(record, where: str) -> dict:
    """A validated row: {"instruction", "input", "output"} or {"messages"}. DataError names file:line."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction'/'output' or 'messages'")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs role (system, user or assistant) and string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: missing string '{key}' (or give 'messages')")
    extra = record.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string")
    return {"instruction": record["instruction"], "input": extra, "output": record["output"]}


def read_rows(path: str | Path) -> list[dict]:
    rows, problems = [], []
    for where, record in read_records(path):
        try:
            rows.append(parse_row(record, where))
        except DataError as e:
            problems.extend(e.problems)
    if problems:
        more = [f"... and {len(problems) - MAX_REPORTED} more bad rows"] if len(problems) > MAX_REPORTED else []
        raise DataError(*problems[:MAX_REPORTED], *more)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------- rendering


def render(row: dict, cfg: DataConfig, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, trainable character spans) for one row."""
    eos = tokenizer.eos_token or ""
    if "messages" not in row:
        template = cfg.prompt_template if row["input"] else cfg.prompt_template_no_input
        prompt = template.format(instruction=row["instruction"], input=row["input"])
        text = prompt + row["output"] + eos
        return text, [(len(prompt), len(text))]
    if getattr(tokenizer, "chat_template", None):
        return _render_chat_template(row["messages"], tokenizer)
    head, tail = cfg.chat_turn_template.split("{content}", 1)
    text, spans = "", []
    for m in row["messages"]:
        text += head.format(role=m["role"])
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
        else:
            text += m["content"]
        text += tail.format(role=m["role"])
    return text, spans


def _render_chat_template(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Spans from the tokenizer's own template: each assistant turn is what rendering it adds
    after the prompt for it (content and the template's end-of-turn marker)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not after.startswith(before):
            raise DataError("the tokenizer's chat template does not render conversations prefix-stably; "
                            "set data.chat_turn_template and remove the tokenizer's chat template")
        spans.append((len(before), len(after)))
    return tokenizer.apply_chat_template(messages, tokenize=False), spans


def encode(row: dict, cfg: DataConfig, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels copy the ids inside trainable spans and are -100 elsewhere."""
    text, spans = render(row, cfg, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _with_labels(list(enc["input_ids"]), enc["offset_mapping"], spans, text, tokenizer)


def _with_labels(ids: list[int], offsets, spans, text: str, tokenizer) -> tuple[list[int], list[int]]:
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        labels.append(tok if inside else IGNORE)
    bos = tokenizer.bos_token_id
    if bos is not None and not (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        ids, labels = [bos] + ids, [IGNORE] + labels
    return ids, labels


class InstructionEncoder:
    """A batch of raw rows -> token rows in one pass of datasets.map: each row checked
    (a bad one gets its message in `_error`), rendered, tokenized with the fast tokenizer's
    batch path, labelled from its spans, and cut or marked for dropping at max_length."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def check(self, where: str, record) -> None:
        parse_row(record, where)

    def __call__(self, batch: dict) -> dict:
        from launcher.data.pipeline import ROW, records

        texts, spans, errors = [], [], []
        rows = records(batch)
        for record in rows:
            try:
                text, span = render(parse_row(record, ROW), self.cfg, self.tokenizer)
                error = ""
            except DataError as e:
                text, span, error = "", [], e.problems[0]
            texts.append(text)
            spans.append(span)
            errors.append(error)
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        chat = [r.get("messages") is not None for r in rows]
        out = {k: [] for k in ("input_ids", "labels", "seq_lens", "length", "_error", "_drop", "_truncated", "_label_tokens")}
        out["_chat"] = chat
        for ids, offsets, span, text, error in zip(enc["input_ids"], enc["offset_mapping"], spans, texts, errors):
            ids, labels = _with_labels(list(ids), offsets, span, text, self.tokenizer)
            drop = truncated = False
            if len(ids) > self.cfg.max_length:
                if self.cfg.truncation == "drop":
                    drop = True
                else:
                    truncated = True
                    ids, labels = ids[: self.cfg.max_length], labels[: self.cfg.max_length]
            n_labels = sum(x != IGNORE for x in labels)
            drop = drop or n_labels == 0 or bool(error)
            for k, v in (("input_ids", ids), ("labels", labels), ("seq_lens", [len(ids)]), ("length", len(ids)),
                         ("_error", error), ("_drop", drop), ("_truncated", truncated), ("_label_tokens", n_labels)):
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
                            dropped=int(pc.sum(drop).as_py() or 0), chat_rows=int(pc.sum(table["_chat"]).as_py() or 0))
        table = table.filter(keep).drop_columns(["_drop", "_truncated", "_label_tokens", "_chat"])
        kept = ds.data.table.filter(keep)
        stats.tokens = int(pc.sum(kept["length"]).as_py() or 0)
        stats.label_tokens = int(pc.sum(kept["_label_tokens"]).as_py() or 0)
        if table.num_rows == 0:
            raise DataError(f"no usable rows: all {stats.rows} were dropped (data.max_length {self.cfg.max_length}, "
                            f"data.truncation {self.cfg.truncation})")
        if self.cfg.packing:
            stats.blocks_greedy = len(greedy_plan(table["length"].to_pylist(), self.cfg.max_length))
            table = pack_table(table, self.cfg.max_length, "bfd")
        return datasets.Dataset(table), stats.__dict__


# ---------------------------------------------------------------- datasets


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # too long under truncation=drop, or no response token left after truncating
    tokens: int = 0  # tokens kept (before padding)
    label_tokens: int = 0
    chat_rows: int = 0  # rows given as `messages`
    blocks_greedy: int = 0  # packed blocks had rows been packed in order (for comparison)

    def line(self, split: str) -> str:
        return (f"{split}: {self.rows} rows, {self.truncated} truncated, {self.dropped} dropped "
                f"(data.truncation), {self.tokens:,} tokens, {self.label_tokens:,} in responses")


def encode_rows(rows: list[dict], cfg: DataConfig, tokenizer) -> tuple[list, list, EncodeStats]:
    stats = EncodeStats()
    all_ids, all_labels = [], []
    for row in rows:
        stats.rows += 1
        ids, labels = encode(row, cfg, tokenizer)
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if all(x == IGNORE for x in labels):
            stats.dropped += 1
            continue
        all_ids.append(ids)
        all_labels.append(labels)
        stats.tokens += len(ids)
        stats.label_tokens += sum(x != IGNORE for x in labels)
    return all_ids, all_labels, stats


def pack(ids: list[list[int]], labels: list[list[int]], block: int) -> tuple[list, list, list]:
    """Greedy, in order: examples are appended to the current block until the next does not fit.
    No example is split, so every example keeps all its tokens."""
    out_ids, out_labels, out_lens = [], [], []
    cur_ids, cur_labels, cur_lens = [], [], []
    for x, y in zip(ids, labels):
        if cur_ids and len(cur_ids) + len(x) > block:
            out_ids.append(cur_ids), out_labels.append(cur_labels), out_lens.append(cur_lens)
            cur_ids, cur_labels, cur_lens = [], [], []
        cur_ids, cur_labels, cur_lens = cur_ids + x, cur_labels + y, cur_lens + [len(x)]
    if cur_ids:
        out_ids.append(cur_ids), out_labels.append(cur_labels), out_lens.append(cur_lens)
    return out_ids, out_labels, out_lens


def greedy_plan(lengths: list[int], block: int) -> list[list[int]]:
    """Blocks of `pack`: rows in order, a new block when the next row does not fit."""
    plan, used = [], 0
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


class LMCollator:
    """Pads to the longest row. Unpacked rows get a 2-D attention mask. Packed rows get no
    mask at all, only position ids that restart at 0 for every example (and for the padding
    at the end): the model finds the example boundaries from them (transformers' packed-
    sequence detection: a block-diagonal causal mask under sdpa/eager, varlen kernels under
    flash attention), so nothing of size L x L is built here and no float mask can disagree
    with the model's dtype."""

    def __init__(self, pad_id: int, packed: bool):
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, rows: list[dict]) -> dict:
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
        batch = {"input_ids": ids, "labels": labels}
        if not self.packed:
            batch["attention_mask"] = mask
            return batch
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            start = 0
            for length in list(r["seq_lens"]) + [width - sum(r["seq_lens"])]:
                positions[i, start : start + length] = torch.arange(length)
                start += length
        batch["position_ids"] = positions
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
    rows = []
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return paths
