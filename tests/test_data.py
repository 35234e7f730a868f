"""Data: formats, label shapes, names vs ids, file:line errors, sampler sharding, token cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launcher.config import DataConfig
from launcher.data import batching, synthetic
from launcher.data.clauses import load_split
from launcher.errors import DataError

from conftest import TINY

ROWS = [
    {"text": "We may end your account at any time.", "labels": [1]},
    {"text": "You can export your data.", "labels": []},
    {"text": "Governed by the laws of Ireland; courts of Dublin.", "labels": [5, 6]},
]


def write(tmp_path, fmt, rows):
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        keys = sorted({k for r in rows for k in r})
        lines = [",".join(keys)]
        for r in rows:
            cells = []
            for k in keys:
                v = r.get(k, "")
                v = json.dumps(v) if isinstance(v, list) else str(v)
                cells.append('"' + v.replace('"', '""') + '"')
            lines.append(",".join(cells))
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(path, mode="binary", **kw):
    return load_split(DataConfig(mode=mode, **kw), "train", str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_and_both_modes(tmp_path, fmt):
    path = write(tmp_path, fmt, ROWS)
    texts, targets = load(path, "binary")
    assert texts == [r["text"] for r in ROWS]
    assert targets == [1, 0, 1]
    _, multi = load(path, "multilabel")
    assert [[i for i, v in enumerate(t) if v] for t in multi] == [[1], [], [5, 6]]
    assert all(len(t) == 8 for t in multi)


def test_names_and_ids_are_equivalent(tmp_path):
    by_id = write(tmp_path, "jsonl", [{"text": "a", "labels": [0, 7]}, {"text": "b", "label": 0}])
    (tmp_path / "n").mkdir()
    by_name = write(tmp_path / "n", "jsonl", [{"text": "a", "labels": ["limitation of liability", "Arbitration"]},
                                              {"text": "b", "label": "fair"}])
    assert load(by_id, "multilabel")[1][0] == load(by_name, "multilabel")[1][0]
    assert load(by_id)[1] == load(by_name)[1] == [1, 0]
    # A single category name under `label` means unfair in binary mode.
    single = write(tmp_path / "n", "jsonl", [{"text": "c", "label": "Choice of law"}, {"text": "d", "label": "unfair"}])
    assert load(single)[1] == [1, 1]


def test_custom_label_names_for_other_tasks(tmp_path):
    path = write(tmp_path, "jsonl", [{"text": "x", "labels": ["spam"]}, {"text": "y", "labels": ["ham", "spam"]}])
    _, t = load(path, "multilabel", label_names=["ham", "spam"])
    assert t == [[0.0, 1.0], [1.0, 1.0]]


def test_bad_rows_are_reported_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"text": "ok", "labels": []}) + "\n"
        + "{not json\n"
        + "\n"
        + json.dumps({"text": "", "labels": []}) + "\n"
        + json.dumps({"text": "x", "labels": [9]}) + "\n"
        + json.dumps({"text": "x", "labels": ["Nonsense"]}) + "\n"
        + json.dumps({"text": "x"}) + "\n"
        + json.dumps({"text": "x", "label": 12}) + "\n"
    )
    with pytest.raises(DataError) as e:
        load(path, "multilabel")
    assert e.value.problems[0].startswith(f"{path}:2: not valid JSON")
    assert e.value.problems[1] == f"{path}:4: missing or empty 'text'"
    assert e.value.problems[2] == f"{path}:5: category id 9 out of range 0..7"
    assert e.value.problems[3].startswith(f"{path}:6: unknown category 'Nonsense'")
    assert e.value.problems[4] == f"{path}:7: needs exactly one of 'label' or 'labels'"
    assert e.value.problems[5].startswith(f"{path}:8: 'label' 12 is not a category in data.mode=multilabel")
    # In binary mode the same `label: 2` is not a valid binary label.
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "ok", "label": 0}) + "\n" + json.dumps({"text": "x", "label": 2}) + "\n")
    with pytest.raises(DataError, match=rf"^{one}:2: 'label' must be 0, 1, fair or unfair, or an UNFAIR-ToS category name; got 2; for your own classes set data.label_names$"):
        load(one, "binary")


def test_csv_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"fine",0\n"multi\nline text",1\n"",1\n')
    with pytest.raises(DataError) as e:
        load(path)
    assert e.value.problems == [f"{path}:5: missing or empty 'text'"]


def test_hub_unreachable_is_one_clear_line():
    with pytest.raises(DataError) as e:
        load_split(DataConfig(), "train", None)
    (line,) = e.value.problems
    assert line.startswith("data.hub_dataset: cannot load coastalcph/lex_glue")
    assert "data.train_file=" in line


def test_synthetic_is_deterministic_and_learnable_shape(tmp_path):
    a = synthetic.generate_clauses(200, seed=3)
    assert a == synthetic.generate_clauses(200, seed=3)
    assert a != synthetic.generate_clauses(200, seed=4)
    unfair = sum(bool(r["labels"]) for r in a) / len(a)
    assert 0.25 < unfair < 0.55
    assert {c for r in a for c in r["labels"]} == set(range(8))
    train, val = synthetic.write_splits(tmp_path, 50, 20)
    assert load(train)[0] and len(load(val)[0]) == 20


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_global_batch_is_world_size_invariant(world):
    ref = batching.StepSampler(100, 16, 4, 0, 1, seed=7)
    shards = [batching.StepSampler(100, 16, 16 // (4 * world) and 4, r, world, seed=7) for r in range(world)]
    assert ref.steps_per_epoch == 6  # 100 // 16; the 4-row tail is dropped
    for step in range(ref.steps_per_epoch * 2):  # two epochs
        whole = [i for mb in ref.step_microbatches(step) for i in mb]
        parts = [[i for mb in s.step_microbatches(step) for i in mb] for s in shards]
        assert sum(parts, []) == whole  # ranks take disjoint, contiguous slices of the same global batch
        assert all(len(mb) == 4 for s in shards for mb in s.step_microbatches(step))
    # Epochs are reshuffled; within an epoch no example repeats.
    e0 = [i for s in range(6) for mb in ref.step_microbatches(s) for i in mb]
    e1 = [i for s in range(6, 12) for mb in ref.step_microbatches(s) for i in mb]
    assert len(set(e0)) == 96 and e0 != e1


@pytest.mark.parametrize("grouped", [False, True])
def test_another_global_batch_counts_the_rows_of_its_epoch_it_skips_and_reads_again(grouped):
    """A run forked (or allowed) with another global batch goes on at step x new batch of an
    order the batch also cuts (grouped): the note counts, against the rows an uninterrupted
    run of the old batch would have read that epoch, those never read and those read twice,
    here replayed step by step; a position past the epoch names the epoch instead."""
    import numpy as np

    lengths = np.random.default_rng(0).integers(5, 200, 2000)
    new = batching.StepSampler(2000, 32, 32, 0, 1, 7, lengths, grouped)
    old = batching.StepSampler(2000, 16, 16, 0, 1, 7, lengths, grouped)
    step = 10
    seen = {i for s in range(step) for i in old.step_indices(s).tolist()}
    due = {i for s in range(old.steps_per_epoch) for i in old.step_indices(s).tolist()}
    ahead = [i for s in range(step, new.steps_per_epoch) for i in new.step_indices(s).tolist()]
    skipped, again = len(due - seen - set(ahead)), sum(i in seen for i in ahead)
    assert skipped > 0 and (again > 0) == grouped  # (ungrouped: one permutation, read further on)
    assert new.moved_from(16, step) == (f"the data goes on at step 11's place in batches of 32: of epoch 1's rows, "
                                        f"{skipped:,} are skipped and {again:,} read again")
    assert new.moved_from(32, step) == "" and new.moved_from(16, 0) == ""
    assert new.moved_from(16, 70) == ("the data goes on in epoch 2 of batches of 32, where the checkpoint was "
                                      "1,120 rows into epoch 1")  # (62 steps of 32 make an epoch; 125 of 16)


def _clause_split(path, tok, max_length):
    from launcher.data import pipeline, sources
    from launcher.data.clauses import ClauseEncoder

    enc = ClauseEncoder("binary", ["fair", "unfair"], tok, max_length)
    key = {"tokenizer": batching.tokenizer_fingerprint(tok), "max_length": max_length}
    src = sources.resolve(DataConfig(train_file=str(path)), "train")
    return pipeline.Split(src, enc, ("input_ids", "labels"), key, check=enc.check)


def test_tokenize_cache_is_reused(tmp_path):
    from launcher.data import pipeline
    from launcher.data.cache import Cache
    from launcher.data.tokenizer import train_wordpiece

    rows = synthetic.generate_clauses(50)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_wordpiece([r["text"] for r in rows], 200, 32)
    cache = Cache(tmp_path / "cache", "job-1", candidate=True, others_wait=False)
    a = pipeline.prepare(_clause_split(path, tok, 32), cache)
    entries = sorted(p.name for p in (tmp_path / "cache").glob("tokens-*"))
    assert len(entries) == 1 and not a.from_cache
    b = pipeline.prepare(_clause_split(path, tok, 32), cache)
    assert b.from_cache and [b[i] for i in range(50)] == [a[i] for i in range(50)]
    assert a[0]["input_ids"] == tok(rows[0]["text"], truncation=True, max_length=32)["input_ids"]
    assert [a[i]["labels"] for i in range(50)] == [int(bool(r["labels"])) for r in rows]
    pipeline.prepare(_clause_split(path, tok, 16), cache)  # another max_length: another entry
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 2
    path.write_text(path.read_text() + json.dumps(rows[0]) + "\n")  # the file changed: another entry
    c = pipeline.prepare(_clause_split(path, tok, 32), cache)
    assert not c.from_cache and len(c) == 51


def test_the_token_cache_is_keyed_by_the_code_and_the_whole_tokenizer(tmp_path, monkeypatch):
    """A cache hit skips every row check, so what reads rows is in the key: launcher's data and
    task code (an install elsewhere with the same files keys alike; one changed byte does not)
    and the libraries' versions; and the tokenizer beyond its backend JSON: the EOS, BOS and
    truncation side that tokenizer_config.json holds (a fixed EOS kept the old one's ids)."""
    import shutil

    from launcher.data import pipeline
    from launcher.data.cache import Cache
    from launcher.data.tokenizer import train_wordpiece

    rows = synthetic.generate_clauses(20)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_wordpiece([r["text"] for r in rows], 200, 32)
    cache = Cache(tmp_path / "cache", "job-1", candidate=True, others_wait=False)
    assert not pipeline.prepare(_clause_split(path, tok, 32), cache).from_cache
    assert pipeline.prepare(_clause_split(path, tok, 32), cache).from_cache
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "another launcher")
    assert not pipeline.prepare(_clause_split(path, tok, 32), cache).from_cache
    monkeypatch.undo()

    import launcher.data
    import launcher.tasks

    copies = []
    for package in (launcher.data, launcher.tasks):
        here = tmp_path / "install" / package.__name__
        shutil.copytree(Path(package.__file__).parent, here, ignore=shutil.ignore_patterns("__pycache__"))
        copies += sorted(here.glob("*.py"))
    assert len(copies) > 10 and pipeline._code_fingerprint(copies, pipeline.CODE_LIBRARIES) == pipeline.code_fingerprint()
    clauses = next(f for f in copies if f.name == "clauses.py")
    clauses.write_text(clauses.read_text() + "\n")
    assert pipeline._code_fingerprint(copies, pipeline.CODE_LIBRARIES) != pipeline.code_fingerprint()

    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    same = batching.tokenizer_fingerprint(tok)
    assert batching.tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok")) == same  # another process alike
    for change in ({"eos_token": "[SEP]"}, {"bos_token": "[CLS]"}, {"truncation_side": "left"}):
        other = AutoTokenizer.from_pretrained(tmp_path / "tok", **change)
        assert batching.tokenizer_fingerprint(other) != same, change


def test_pad_collator_pads_per_batch():
    c = batching.PadCollator(pad_id=0)
    out = c([{"input_ids": [5, 6, 7], "labels": torch.tensor(1)}, {"input_ids": [5], "labels": torch.tensor(0)}])
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_local_tokenizer_is_reproducible_across_processes(tmp_path):
    """tokenizers' WordPieceTrainer gave different vocabularies for identical data in two
    processes; ours must not. Built in two fresh interpreters and compared byte for byte."""
    import subprocess
    import sys

    code = (
        "import sys; from launcher.data.synthetic import generate_clauses; "
        "from launcher.data.tokenizer import train_wordpiece; "
        "t = train_wordpiece([r['text'] for r in generate_clauses(300)], 300, 32); "
        "sys.stdout.write(t.backend_tokenizer.to_str())"
    )
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0]) > 1000
    from launcher.data.tokenizer import train_wordpiece

    tok = train_wordpiece(["We may terminate your account"] * 3, 100, 16)
    ids = tok("We may terminate your tea")["input_ids"]
    assert tok.unk_token_id not in ids  # an unseen word of seen characters falls back to pieces
    assert len(ids) > 7 and tok.decode(ids, skip_special_tokens=True) == "we may terminate your tea"


def test_labels_that_read_two_ways_are_refused_or_read_by_name(tmp_path):
    """Found reading the encoder: `label: 1` in multilabel mode became category 1 ("unfair" in
    a binary file, so a binary file run as multilabel trained every unfair clause as one
    category); label names that are digits were read as indices (class "1" became class "2");
    a negative category id (-1: "no label" in some datasets) counted as unfair in binary mode."""
    binary_file = write(tmp_path, "jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    with pytest.raises(DataError) as e:
        load(binary_file, "multilabel")
    assert e.value.problems == [f"{binary_file}:1: 'label' 1 is not a category in data.mode=multilabel (label 0 is "
                                "fair, labels: [0] is category 0): give categories as 'labels': [1] or by name"]
    (tmp_path / "d").mkdir()
    digits = write(tmp_path / "d", "jsonl", [{"text": "a", "labels": ["1"]}, {"text": "b", "labels": ["3", "1"]}])
    assert load(digits, "multilabel", label_names=["1", "2", "3"])[1] == [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    (tmp_path / "s").mkdir()
    single = write(tmp_path / "s", "jsonl", [{"text": "a", "label": "3"}, {"text": "b", "label": "0"}])
    assert load(single, "multilabel", label_names=["0", "2", "3"])[1] == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    (tmp_path / "n").mkdir()
    negative = write(tmp_path / "n", "jsonl", [{"text": "a", "labels": [-1]}])
    with pytest.raises(DataError, match=r":1: category id -1 is negative: a category id is 0 or more$"):
        load(negative)
    other = write(tmp_path / "n", "jsonl", [{"text": "a", "labels": [12]}, {"text": "b", "labels": []}])
    assert load(other)[1] == [1, 0]  # another taxonomy's id is still a category: unfair


def test_a_byte_order_mark_and_blank_lines_read_as_training_reads_them(tmp_path):
    """Excel and Windows editors begin files with a BOM: training's reader skips it, but `eval`
    and `predict` read CSV headers as "\\ufefftext" (every row: missing 'text') and JSONL line 1
    as invalid JSON. And CSV errors after a blank line named the line before the bad row."""
    from launcher.data.sources import read_records

    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes("\ufefftext,label\nwe may end it,1\n".encode())
    jsonl_file = tmp_path / "bom.jsonl"
    jsonl_file.write_bytes("\ufeff".encode() + b'{"text": "we may end it", "label": 1}\n')
    for path in (csv_file, jsonl_file):
        assert [r for _, r in read_records(path)][0]["text"] == "we may end it", path
        assert load(path)[1] == [1]
    blank = tmp_path / "blank.csv"
    blank.write_text('text,label\n"a",0\n\n"b",1\n"c",7\n')
    with pytest.raises(DataError) as e:
        load(blank)
    assert e.value.problems[0].startswith(f"{blank}:5: ")  # the bad row's own line, past the blank one


def test_labels_that_change_type_read_past_blank_lines_and_a_byte_order_mark(tmp_path):
    """Labels as numbers, then as names: datasets' JSON reader falls back to parsing each line
    in Python, which fails on a blank line or a BOM ("cannot be read as JSON lines"), though
    the file without them trains. The rows are read from a copy without them, made once in the
    cache; the file's own lines still name a bad row."""
    from launcher.data import sources

    rows = [{"text": f"clause {i}", "label": i % 2 if i < 6 else ["fair", "unfair"][i % 2]} for i in range(10)]
    lines = [json.dumps(r) + "\n" for r in rows]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(lines))
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(("\ufeff" + "".join(lines[:6]) + "\n  \r\n" + "".join(lines[6:]) + "\n").encode())
    expected = ([r["text"] for r in rows], [i % 2 for i in range(10)])
    assert load(plain) == expected and load(odd) == expected
    cache = tmp_path / "cache"
    source = sources.resolve(DataConfig(train_file=str(odd)), "train")
    assert source.read(cache).num_rows == 10
    (copy,) = (cache / "rows-alone").iterdir()
    assert source.read(cache).num_rows == 10 and list((cache / "rows-alone").iterdir()) == [copy]  # made once
    assert source.read(tmp_path / "runs[1]" / "cache").num_rows == 10  # (a glob's characters in the cache's path)
    odd.write_bytes(odd.read_bytes() + b'{"text": "clause x", "label": "maybe"}\n')
    with pytest.raises(DataError) as e:
        load(odd)
    assert e.value.problems == [f"{odd}:14: 'label' must be 0, 1, fair or unfair, or an UNFAIR-ToS category name; got 'maybe'; for your own classes set data.label_names"]
    assert source.read(cache).num_rows == 11  # the changed file's own copy, in place of the old one
    assert [p.name for p in (cache / "rows-alone").iterdir()] != [copy.name] and len(list((cache / "rows-alone").iterdir())) == 1
    os.chmod(cache, 0o2770)  # a group-shared cache (data.cache_shared): its copies are the group's too
    shutil.rmtree(cache / "rows-alone")
    assert source.read(cache).num_rows == 11
    (made,) = (cache / "rows-alone").iterdir()
    assert (cache / "rows-alone").stat().st_mode & 0o7777 == 0o2770 and made.stat().st_mode & 0o777 == 0o660


def test_whole_number_float_labels_read_as_their_ints_and_a_bad_one_is_its_own_line(tmp_path):
    """One `"label": 1.0` row (pandas writes labels so) made the JSON reader turn the whole
    column into floats, and every row was refused (`:1: ... got 0.0` for a line holding 0).
    Whole floats are their ints, in JSONL and Parquet, label and labels alike; NaN and 0.5 are
    refused on their own line only."""
    ints = [{"text": f"clause {i}", "label": i % 2} for i in range(8)]
    floats = [dict(r, label=float(r["label"])) if i == 5 else r for i, r in enumerate(ints)]
    cfg = DataConfig(mode="binary")
    for name in ("i", "p"):
        (tmp_path / name).mkdir()
    want = load_split(cfg, "train", str(write(tmp_path / "i", "jsonl", ints)))
    assert load_split(cfg, "train", str(write(tmp_path, "jsonl", floats))) == want
    pq_rows = [dict(r, label=float(r["label"])) for r in ints]
    assert load_split(cfg, "train", str(write(tmp_path / "p", "parquet", pq_rows))) == want
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in floats[:6]) + '{"text": "x", "label": 0.5}\n')
    with pytest.raises(DataError) as e:
        load_split(cfg, "train", str(bad))
    assert [p for p in e.value.problems if p.startswith(str(bad))] == [
        f"{bad}:7: 'label' must be 0, 1, fair or unfair, or an UNFAIR-ToS category name; got 0.5; for your own classes set data.label_names"]
    ml = tmp_path / "ml.jsonl"
    ml.write_text(json.dumps({"text": "a", "labels": [1.0, 4.0]}) + "\n" + json.dumps({"text": "b", "labels": [2]}) + "\n")
    _, targets = load_split(DataConfig(mode="multilabel"), "train", str(ml))
    assert [[i for i, v in enumerate(t) if v] for t in targets] == [[1, 4], [2]]
    # A CSV holds the text "1.0" (pandas' to_csv of a float column): refused on every row, at
    # training and at eval, while the README said whole floats are ints.
    from launcher.data.clauses import LabelEncoder, parse_rows
    from launcher.data.sources import read_records

    csv_file = tmp_path / "f.csv"
    csv_file.write_text("text,label\n" + "".join(f"{r['text']},{float(r['label'])}\n" for r in ints))
    assert load_split(cfg, "train", str(csv_file)) == want
    assert parse_rows(read_records(csv_file), LabelEncoder("binary", ["fair", "unfair"]), str(csv_file)) == want
    (tmp_path / "n.csv").write_text("text,label\nx,1.0\ny,0.0\n")  # a name that looks like a number is the name
    assert load_split(DataConfig(mode="binary", label_names=["1.0", "0.0"]), "train", str(tmp_path / "n.csv"))[1] == [0, 1]


def test_a_multi_hot_labels_vector_is_refused_not_read_as_categories_0_and_1(tmp_path):
    """`"labels": [0, 1, 0, 0, 0, 0, 0, 0]`, the usual 0/1 layout, was read as category ids:
    every clause had category 0 (and a positive one category 1), without a word."""
    path = tmp_path / "hot.jsonl"
    path.write_text(json.dumps({"text": "a", "labels": [0, 1, 0, 0, 0, 0, 0, 0]}) + "\n"
                    + json.dumps({"text": "b", "labels": [3]}) + "\n"
                    + json.dumps({"text": "c", "labels": ["Arbitration", "Arbitration"]}) + "\n")
    for mode in ("multilabel", "binary"):
        with pytest.raises(DataError) as e:
            load_split(DataConfig(mode=mode), "train", str(path))
        assert [p for p in e.value.problems if p.startswith(str(path))] == [
            f"{path}:1: 'labels' [0, 1, 0, 0, 0, 0, 0, 0] looks like a 0/1 vector over the categories; launcher reads "
            "'labels' as the categories a clause has, by id or name (e.g. [1, 4], or [] for none)"], e.value.problems
    # Two categories: [0, 0] is a vector (an id twice is none), refused; [0, 1] reads as both
    # categories (it was [0, 0] -> category 0, silently).
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps({"text": "a", "labels": [0, 1]}) + "\n" + json.dumps({"text": "b", "labels": [0, 0]}) + "\n")
    with pytest.raises(DataError) as e:
        load_split(DataConfig(mode="multilabel", label_names=["Sports", "Politics"]), "train", str(two))
    assert [p for p in e.value.problems if p.startswith(str(two))] == [
        f"{two}:2: 'labels' [0, 0] looks like a 0/1 vector over the categories; launcher reads "
        "'labels' as the categories a clause has, by id or name (e.g. [1, 4], or [] for none)"]


def test_a_key_given_twice_a_jsonl_array_and_a_utf16_file_read_alike_for_training_and_eval(tmp_path):
    """Training and `launcher eval`/`predict` (read_records) disagreed: a line giving "text"
    twice failed training with no line named and was read silently by eval (the last value);
    a .jsonl holding one JSON array trained and was refused by eval line by line; a UTF-16
    file was "expected a JSON object" at training and "not valid UTF-8" at eval."""
    from launcher.data.sources import read_records

    rows = [{"text": f"clause {i}", "label": i % 2} for i in range(6)]
    dup = tmp_path / "dup.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[3] = '{"text": "first", "text": "second", "label": 1}'
    dup.write_text("\n".join(lines) + "\n")
    said = f"{dup}:4: duplicate key 'text'"
    with pytest.raises(DataError) as e:
        load_split(DataConfig(mode="binary"), "train", str(dup))
    assert e.value.problems == [said]
    assert [str(r) for _, r in read_records(dup) if isinstance(r, DataError)] == [said]

    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps(rows, indent=2))
    assert [r for _, r in read_records(array)] == rows
    assert load_split(DataConfig(mode="binary"), "train", str(array)) == ([r["text"] for r in rows], [r["label"] for r in rows])
    from launcher.config import SyntheticDataConfig
    from launcher.data import sources

    source = sources.resolve(DataConfig(synthetic=SyntheticDataConfig(enabled=False), train_file=str(array),
                                        validation_file=str(array)), "train")
    assert source.count_rows() in (None, len(rows))  # its lines are not rows
    assert source.locate([3]) == {3: f"{source}: row 4"}

    for name, encoding in (("bom.jsonl", "utf-16"), ("le.jsonl", "utf-16-le")):
        wide = tmp_path / name
        wide.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode(encoding))
        with pytest.raises(DataError) as e:
            load_split(DataConfig(mode="binary"), "train", str(wide))
        said = f"{wide}:1: not UTF-8 text (NUL bytes first: UTF-16?); save it as UTF-8"
        assert e.value.problems == [said]
        with pytest.raises(DataError) as e:
            list(read_records(wide))  # eval and predict
        assert e.value.problems == [said]
    # One object pretty-printed in a .json file is one row to training's reader; eval said "not
    # valid JSON" for each of its lines. One conversation with its turns is a row, not columns.
    pretty = tmp_path / "one.json"
    for row in (rows[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}):
        pretty.write_text(json.dumps(row, indent=2))
        assert list(read_records(pretty)) == [(f"{pretty}:1", row)]
    columns = tmp_path / "columns.json"  # pandas' DataFrame.to_json(): {"text": {"0": ...}, "label": {"0": ...}}
    columns.write_text(json.dumps({"text": {str(i): r["text"] for i, r in enumerate(rows)},
                                   "label": {str(i): r["label"] for i, r in enumerate(rows)}}))
    with pytest.raises(DataError) as e:
        list(read_records(columns))
    assert e.value.problems == [f"{columns}: one JSON object of columns ('text', 'label': lists of 6); give rows: one JSON "
                                "object per line (.jsonl) or a JSON array of objects"]
    lines = tmp_path / "lines.json"  # (JSON lines named .json: still a row per line)
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r for _, r in read_records(lines)] == rows


def test_a_byte_that_is_not_utf8_in_a_csv_is_named_by_its_line_read_a_block_at_a_time(tmp_path):
    """The CSV reader decodes a block at a time, so its line number was the block's (line 1 for
    a bad byte on line 3); the byte is found by reading blocks too (a refused training CSV may be
    many GB), also where a block ends inside a character."""
    from launcher.data import sources

    bad = tmp_path / "lat.csv"
    bad.write_bytes("text,label\nPrix en €,1\nWe may n".encode() + b"\xf6t.,0\n")
    (where, problem), = [(w, r) for w, r in sources.read_records(bad) if isinstance(r, DataError)]
    assert (where, problem.problems) == (f"{bad}:3", [f"{bad}:3: not valid UTF-8 (byte 9 of the line)"])
    assert {sources._first_bad_byte(bad, block) for block in (1, 2, 3, 7, 1 << 20)} == {(f"{bad}:3", 9)}


@pytest.mark.parametrize("header, row, said", [
    ("text, label", "We may end it at any time.,1", "no 'label' or 'labels' column (its columns: 'text', ' label'); "
     "a column name has spaces around it (a space after a comma in the header?)"),
    ("text;label", "We may end it at any time.;1", "no 'text' and no 'label' or 'labels' column (its columns: 'text;label'); "
     "CSV columns are separated by commas"),
])
def test_a_header_wrong_for_the_whole_file_is_one_line_at_training_and_eval(tmp_path, header, row, said):
    """Every row was refused on its own line ("needs exactly one of 'label' or 'labels'", ten
    lines and a count) for what one look at the header explains."""
    from launcher.data.clauses import LabelEncoder, parse_rows
    from launcher.data.sources import read_records

    path = tmp_path / "train.csv"
    path.write_text(header + "\n" + (row + "\n") * 40)
    with pytest.raises(DataError) as e:
        load_split(DataConfig(mode="binary"), "train", str(path))
    assert e.value.problems == [f"{path}: {said}"]
    with pytest.raises(DataError) as e:  # launcher eval
        parse_rows(read_records(path), LabelEncoder("binary", ["fair", "unfair"]), str(path))
    assert e.value.problems == [f"{path}: {said}"]


def test_every_reader_lists_bad_rows_the_same_way(tmp_path):
    """Thirteen bad rows: the first ten rows' problems, then one line counting the three not
    shown, in one wording whether a clause file, an instruction file or predict's input."""
    from launcher.cli import _read_clauses
    from launcher.data.clauses import LabelEncoder, parse_rows, read_records
    from launcher.data.instructions import read_rows
    from launcher.data.sources import BadRows
    from launcher.errors import UserError

    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": "", "label": 0, "instruction": "", "output": 1}) + "\n" for _ in range(13))
                    + json.dumps({"text": "fine", "label": 0, "instruction": "Say hi", "output": "hi"}) + "\n")
    readers = {str(path): lambda: parse_rows(read_records(path), LabelEncoder("binary", ["fair", "unfair"]), str(path)),
               f"{path} ": lambda: read_rows(path),
               f"--input: {path}": lambda: _read_clauses(path)}
    for source, read in readers.items():
        with pytest.raises(UserError) as e:
            read()
        shown = e.value.problems
        assert shown[-1] == f"{source.strip()}: 3 more bad rows not shown", source
        assert [p.split(": ")[0] for p in shown[:-1]] == [f"{path}:{n}" for n in range(1, 11)], source
    # A row with several problems is one row of the ten.
    bad = BadRows("f")
    for n in range(12):
        bad.add([f"f:{n}: a", f"f:{n}: b"] if n == 0 else [f"f:{n}: a"])
    assert bad.lines() == ["f:0: a", "f:0: b", *(f"f:{n}: a" for n in range(1, 10)), "f: 2 more bad rows not shown"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_file_whose_path_holds_glob_or_variable_characters_reads_as_itself(tmp_path, monkeypatch, fmt):
    """datasets.load_dataset takes a name as a glob pattern and expands $VARS in it: a file
    under `d[1]/` read as "cannot be read", one under `e$HOME/` as a file elsewhere. Both read
    the rows of the file itself, as from a plain path, and the cache's own path may hold them
    too (an output directory `runs[1]`)."""
    import tempfile

    from launcher.data import sources

    monkeypatch.setenv("LAUNCHER_TEST_VAR", "elsewhere")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (links for the cache under runs[1] go there)
    rows = [{"text": f"clause {i}", "label": str(i % 2)} for i in range(5)]

    def write(folder: Path) -> Path:
        folder.mkdir(parents=True)
        path = folder / f"train.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "csv":
            path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
        else:
            pq.write_table(pa.Table.from_pylist(rows), path)
        return path

    def read(path: Path, cache: Path) -> list[dict]:
        return sources.resolve(DataConfig(train_file=str(path)), "train").read(cache).to_list()

    plain = read(write(tmp_path / "plain"), tmp_path / "cache")
    assert plain == rows
    for odd in ("d[1]", "e$LAUNCHER_TEST_VAR", "all*of?them{x}"):
        assert read(write(tmp_path / odd), tmp_path / "cache") == plain, odd
        assert read(tmp_path / odd / f"train.{fmt}", tmp_path / "runs[1]" / "cache") == plain, odd
    assert len(list((tmp_path / f"launcher-{os.getuid()}-links").iterdir())) == 3


def test_a_dataset_folder_whose_path_is_a_pattern_is_refused_in_one_line(tmp_path):
    """data.hub_dataset=DIR is read by datasets as a pattern too, after resolving the folder's
    links (so no link of a plain name helps): `d[1]/` "doesn't contain any data files", `e$X/`
    was looked for elsewhere, and `s*/` read the rows of `sX/` beside it as well. Refused,
    naming the field, the folder and its special characters; a plain folder reads."""
    from launcher.data import sources

    def folder(name: str, text: str) -> Path:
        (tmp_path / name).mkdir()
        for split in ("train", "validation"):
            (tmp_path / name / f"{split}.jsonl").write_text(json.dumps({"text": text, "label": "0"}) + "\n")
        return tmp_path / name

    def read(path: Path) -> list[dict]:
        return sources.resolve(DataConfig(hub_dataset=str(path)), "train").read(tmp_path / "cache").to_list()

    assert read(folder("sX", "beside")) == [{"text": "beside", "label": "0"}]
    assert read(folder("b{x}", "braces")) == [{"text": "braces", "label": "0"}]  # (read as itself: not refused)
    for name, odd in (("s*", "*"), ("d[1]", "[ ]"), ("e$X", "$")):
        with pytest.raises(DataError) as e:
            read(folder(name, "mine"))
        (line,) = e.value.problems
        assert line.startswith(f"data.hub_dataset: {tmp_path / name}: datasets reads a folder's path as a pattern, "
                               f"where {odd} of {tmp_path / name} are special"), line


def test_your_own_classes_one_of_several_a_pair_and_categories(tmp_path):
    """Another task's labels (the audit's sentiment, spam and topic files): a class name comes
    before an id, so names that are digits mean themselves (label "1" under names "1", "2" was
    read as id 1, the class named "2", and scored 0 at eval); the UNFAIR-ToS conventions hold
    under the default names only ("Arbitration" was read as spam, label 0 as "no topic")."""
    names = ["negative", "neutral", "positive"]
    rows = [{"text": "a", "label": "Positive "}, {"text": "b", "label": 0}, {"text": "c", "label": "1"},
            {"text": "d", "labels": ["neutral"]}, {"text": "e", "label": 2.0}]
    for fmt in ("jsonl", "csv", "parquet"):
        (tmp_path / fmt).mkdir()
        # (one label column in a table: a row's `labels` of one class as its `label`)
        path = write(tmp_path / fmt, fmt, rows if fmt == "jsonl" else [{"text": r["text"], "label": str(r.get("label",
                     "neutral"))} for r in rows])
        assert load(path, "multiclass", label_names=names)[1] == [2, 0, 1, 1, 2], fmt
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "a", "label": 3}, {"text": "b", "labels": ["neutral", "positive"]}, {"text": "c", "label": "Arbitration"},
        {"text": "d", "labels": []}]))
    with pytest.raises(DataError) as e:
        load(bad, "multiclass", label_names=names)
    assert e.value.problems == [
        f"{bad}:1: 'label' must be a class name (negative, neutral, positive) or an id 0..2; got 3",
        f"{bad}:2: 'labels' ['neutral', 'positive']: data.mode=multiclass takes one class per row "
        "(data.mode=multilabel for several)",
        f"{bad}:3: 'label' must be a class name (negative, neutral, positive) or an id 0..2; got 'Arbitration'",
        f"{bad}:4: 'labels' []: data.mode=multiclass takes one class per row (none given)"]
    # Digit names: the name first, for strings, numbers and whole floats alike, in every mode.
    digits = write(tmp_path, "jsonl", [{"text": "a", "label": "1"}, {"text": "b", "label": 2},
                                       {"text": "c", "label": 1.0}])
    assert load(digits, "binary", label_names=["1", "2"])[1] == [0, 1, 0]
    assert load(digits, "multiclass", label_names=["1", "2", "3"])[1] == [0, 1, 0]
    assert load(digits, "multilabel", label_names=["1", "2", "3"])[1] == [[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]
    (tmp_path / "l").mkdir()
    listed = write(tmp_path / "l", "jsonl", [{"text": "a", "labels": [1]}, {"text": "b", "labels": [3, 2]}])
    assert load(listed, "multilabel", label_names=["1", "2", "3"])[1] == [[1.0, 0, 0], [0, 1.0, 1.0]]
    # ... and then every number is a name: a 0 or a 6 among stars "1".."5" was read as an id,
    # silently class "1" (and a 4 among "1", "3", "5" class "5"); now refused on its line.
    (tmp_path / "s").mkdir()
    stars = write(tmp_path / "s", "jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "6"},
                                            {"text": "c", "labels": [4]}, {"text": "d", "label": 5}])
    names = ["1", "2", "3", "4", "5"]
    with pytest.raises(DataError) as e:
        load(stars, "multiclass", label_names=names[::2])
    said = "is no class: the classes are named by numbers (1, 3, 5), so a number is read as a name, not an id"
    assert e.value.problems == [f"{stars}:1: 'label' 0 {said}", f"{stars}:2: 'label' 6 {said}",
                                f"{stars}:3: 'labels' 4 {said}"]
    with pytest.raises(DataError) as e:
        load(listed, "multilabel", label_names=names[1:])
    assert e.value.problems == [f"{listed}:1: unknown category 1; the categories are named by numbers (2, 3, 4, 5), "
                                "so a number is read as a name, not an id"]
    # A pair of your own: not UNFAIR-ToS's categories, `labels` holds one class.
    spam = tmp_path / "spam.jsonl"
    spam.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "a", "labels": ["spam"]}, {"text": "b", "label": "ham"}, {"text": "c", "label": 1}]))
    assert load(spam, "binary", label_names=["ham", "spam"])[1] == [1, 0, 1]
    # Two classes of your own on LexGLUE-style rows (a category list: any is the second class, as
    # before), and true / false as the second and first class (as before; by name where named so).
    lexglue = tmp_path / "lexglue.jsonl"
    lexglue.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "a", "labels": []}, {"text": "b", "labels": [3, 5]}, {"text": "c", "labels": [0]},
        {"text": "d", "label": True}, {"text": "e", "label": False}]))
    assert load(lexglue, "binary", label_names=["clear", "potentially unfair"])[1] == [0, 1, 1, 1, 0]
    (tmp_path / "tf").mkdir()
    named = write(tmp_path / "tf", "jsonl", [{"text": "a", "label": True}, {"text": "b", "label": "false"}])
    assert load(named, "binary", label_names=["true", "false"])[1] == [0, 1]
    (tmp_path / "two").mkdir()
    both = write(tmp_path / "two", "jsonl", [{"text": "a", "labels": ["ham", "spam"]}])
    with pytest.raises(DataError) as e:  # (it was an unknown UNFAIR-ToS category 'ham')
        load(both, "binary", label_names=["ham", "spam"])
    assert e.value.problems == [f"{both}:1: 'labels' ['ham', 'spam']: data.mode=binary takes one class per row "
                                "(data.mode=multilabel for several)"]
    arbitration = tmp_path / "arb.jsonl"
    arbitration.write_text(json.dumps({"text": "a", "label": "Arbitration"}) + "\n")
    with pytest.raises(DataError) as e:
        load(arbitration, "binary", label_names=["ham", "spam"])
    assert e.value.problems == [f"{arbitration}:1: 'label' must be a class name (ham, spam) or an id 0..1; got 'Arbitration'"]
    assert load(arbitration)[1] == [1]  # (under fair/unfair a category's name is unfair, as before)
    # Categories of your own: label 0 is category 0's id, not "no category" (nor is "none").
    zero = tmp_path / "zero.jsonl"
    zero.write_text(json.dumps({"text": "a", "label": 0}) + "\n" + json.dumps({"text": "b", "label": "none"}) + "\n")
    with pytest.raises(DataError) as e:
        load(zero, "multilabel", label_names=["Sports", "Tech"])
    assert e.value.problems == [
        f"{zero}:1: 'label' 0 is not a category in data.mode=multilabel (labels: [0] is category 0): give categories "
        "as 'labels': [0] or by name; no category is 'labels': []",
        f"{zero}:2: unknown category 'none'; expected one of: Sports, Tech; no category is 'labels': []"]
    assert load(zero, "multilabel")[1] == [[0.0] * 8] * 2  # (under the UNFAIR-ToS categories: no category)


def test_a_pandas_list_column_reads_and_unknown_names_say_what_to_set(tmp_path):
    """pandas' to_csv writes a list column as "['Sports', 'Tech']": it was refused on every row
    as "not a JSON list". Names of another task under the default names now say to set
    data.label_names, and a comma in one cell says the separator is '|'."""
    path = tmp_path / "t.csv"
    path.write_text("text,labels\na,\"['Sports', 'Tech']\"\nb,\"[]\"\nc,Tech\n")
    assert load(path, "multilabel", label_names=["Sports", "Politics", "Tech"])[1] == [[1.0, 0, 1.0], [0, 0, 0], [0, 0, 1.0]]
    (tmp_path / "b").mkdir()
    bad = tmp_path / "b" / "t.csv"
    bad.write_text("text,labels,\na,\"__import__('os')\",\nb,\"Sports,Tech\",\n".replace(",\n", "\n"))
    with pytest.raises(DataError) as e:
        load(bad, "multilabel", label_names=["Sports", "Tech"])
    assert e.value.problems == [f"{bad}:2: unknown category \"__import__('os')\"; expected an id or one of: Sports, Tech",
                                f"{bad}:3: unknown category 'Sports,Tech'; expected an id or one of: Sports, Tech; "
                                "categories in one cell are separated by '|'"]
    with pytest.raises(DataError) as e:
        load(path, "multilabel")
    assert e.value.problems[0].endswith("Jurisdiction, Arbitration; for your own categories set data.label_names")


def test_a_pandas_column_of_numpy_arrays_reads_as_its_categories(tmp_path):
    """pandas' to_csv writes a column of numpy arrays as numpy prints them: "[0 5]", "[0. 5.]",
    "[]", wrapped over lines when long; they were refused as "not a JSON list"."""
    import numpy as np
    import pandas as pd

    path = tmp_path / "t.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"],
                  "labels": [np.array([0, 5]), np.array([2.0]), np.array([], dtype=int), np.arange(8)]}).to_csv(
        path, index=False)
    assert "[0 5]" in path.read_text() and "[2.]" in path.read_text()
    expected = [[1.0 if i in row else 0.0 for i in range(8)] for row in ([0, 5], [2], [], range(8))]
    assert load(path, "multilabel")[1] == expected
    path.write_text("text,labels\na,[0 x]\n")
    with pytest.raises(DataError) as e:
        load(path, "multilabel")
    assert e.value.problems == [f"{path}:2: 'labels' is not a JSON list: '[0 x]'"]


def test_a_tiny_models_tokenizer_is_trained_on_the_text_column_the_config_names(tmp_path):
    """The tokenizer cache was keyed without data.text_column: a run with a misspelt column
    trained (and cached) a vocabulary of special tokens alone, and the corrected run reused it,
    every text read as [UNK]. Each column has its own entry now, and a column that is not there
    is the rows' one line before any tokenizer is trained."""
    from launcher import tasks
    from launcher.config import load_config
    from launcher.data import sources
    from launcher.data.cache import Cache

    path = write(tmp_path, "jsonl", [{"text": "zzz qqq", "sentence": f"the movie was great {i}", "label": i % 2}
                                     for i in range(50)])
    cache = Cache(tmp_path / "cache", "test", candidate=True, others_wait=False)
    src = sources.Source("file", str(path), "train", "data.train_file")

    def tokenizer(column):
        task = tasks.for_config(load_config(TINY, [f"data.text_column={column}", "data.synthetic.enabled=false",
                                                   f"data.train_file={path}", f"data.validation_file={path}"]))
        return task.tokenizer(tmp_path / "run" / column, src, cache)

    with pytest.raises(DataError) as e:
        tokenizer("sentnce")
    assert e.value.problems == [f"{path}: no 'sentnce' (data.text_column) column (its columns: 'text', 'sentence', "
                                "'label')"]
    assert "[UNK]" in tokenizer("text").tokenize("the movie")
    assert tokenizer("sentence").tokenize("the movie") == ["the", "movie"]


def test_text_and_label_come_from_the_columns_the_config_names(tmp_path):
    """data.text_column / data.label_column: another dataset's columns (SST-2's sentence, a
    CSV's capitalised header) are read without renaming the file; a list column or any value in
    multilabel mode is the row's categories. A file without them is one line naming them."""
    path = tmp_path / "t.csv"
    path.write_text("Sentence,Sentiment\ngood film,positive\nbad film,0\n")
    cfg = dict(mode="multiclass", label_names=["negative", "positive"], text_column="Sentence", label_column="Sentiment")
    assert load(path, **cfg) == (["good film", "bad film"], [1, 0])
    topics = write(tmp_path, "jsonl", [{"body": "a", "tags": ["Tech", "Sports"]}, {"body": "b", "tags": "Tech"},
                                       {"body": "c", "tags": []}])
    assert load(topics, "multilabel", label_names=["Sports", "Tech"], text_column="body", label_column="tags")[1] == [
        [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    with pytest.raises(DataError) as e:
        load(path, "multiclass", label_names=["negative", "positive"])
    assert e.value.problems == [f"{path}: no 'text' and no 'label' or 'labels' column (its columns: 'Sentence', "
                                "'Sentiment'); data.text_column and data.label_column name other columns"]
    with pytest.raises(DataError) as e:
        load(path, **{**cfg, "text_column": "review"})
    assert e.value.problems == [f"{path}: no 'review' (data.text_column) column (its columns: 'Sentence', 'Sentiment')"]
    (tmp_path / "e").mkdir()
    empty = write(tmp_path / "e", "jsonl", [{"Sentence": " ", "Sentiment": 1}])
    with pytest.raises(DataError) as e:
        load(empty, **cfg)
    assert e.value.problems == [f"{empty}:1: missing or empty 'Sentence'"]
    # A problem with the label names the file's column, not the 'label' it has none of; a CSV
    # cell holding a list of one class reads as that class, as a `labels` cell does.
    (tmp_path / "c").mkdir()
    cells = tmp_path / "c" / "t.csv"
    cells.write_text('Sentence,Sentiment\na,"[1]"\nb,"[\'negative\']"\n')
    assert load(cells, **cfg)[1] == [1, 0]
    cells.write_text("Sentence,Sentiment\na,\nb,label\n")  # (a header row repeated in the data)
    with pytest.raises(DataError) as e:
        load(cells, **cfg)
    assert e.value.problems == [f"{cells}:2: missing or empty 'Sentiment'",
                                f"{cells}:3: 'Sentiment' must be a class name (negative, positive) or an id 0..1; "
                                "got 'label'"]
