"""Data at scale: every source through `datasets`, one tokenization per cache, memory-mapped
rows, length-grouped steps, a real DataLoader, bad rows still reported as file:line."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config import DataConfig
from launcher.data import batching, instructions, pipeline, sources, synthetic
from launcher.data.cache import Cache
from launcher.data.clauses import ClauseEncoder
from launcher.errors import DataError

from conftest import CONFIGS, FAST, TINY, check, launcher

SFT = CONFIGS / "train" / "sft_tiny.yaml"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def clause_split(path, tok, max_length=32, field="train"):
    enc = ClauseEncoder("binary", ["fair", "unfair"], tok, max_length)
    src = sources.resolve(DataConfig(**{f"{field}_file": str(path)}), field)
    return pipeline.Split(src, enc, ("input_ids", "labels"), {"tok": batching.tokenizer_fingerprint(tok)}, check=enc.check)


@pytest.fixture(scope="module")
def tok():
    from launcher.data.tokenizer import train_wordpiece

    return train_wordpiece([r["text"] for r in synthetic.generate_clauses(300)], 300, 32)


# ---------------------------------------------------------------- sampler: grouping by length


def skewed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Mostly short rows and a long tail, like real clauses (mean ~38, max 128 tokens)."""
    rng = np.random.default_rng(seed)
    return np.minimum(128, 8 + rng.exponential(30, n)).astype(np.int32)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_grouped_steps_are_world_size_invariant_and_cover_each_epoch_once(world):
    lengths = skewed_lengths(1000)
    ref = batching.StepSampler(1000, 32, 8, 0, 1, seed=5, lengths=lengths, group_by_length=True)
    shards = [batching.StepSampler(1000, 32, 8, r, world, seed=5, lengths=lengths, group_by_length=True) for r in range(world)]
    assert ref.steps_per_epoch == 31
    for step in range(ref.steps_per_epoch * 2):
        whole = [i for mb in ref.step_microbatches(step) for i in mb]
        assert sum(([i for mb in s.step_microbatches(step) for i in mb] for s in shards), []) == whole
    e0 = [i for s in range(31) for mb in ref.step_microbatches(s) for i in mb]
    e1 = [i for s in range(31, 62) for mb in ref.step_microbatches(s) for i in mb]
    assert len(set(e0)) == 31 * 32 and e0 != e1  # no repeats within an epoch; reshuffled across epochs


def test_grouped_steps_are_a_pure_function_of_seed_and_step():
    """A resumed run builds a fresh sampler and asks for step k directly: it must get what an
    uninterrupted run got at step k (and another seed gives another order)."""
    lengths = skewed_lengths(2000)
    kw = dict(lengths=lengths, group_by_length=True)
    walked = batching.StepSampler(2000, 32, 8, 0, 1, seed=1, **kw)
    seen = [walked.step_microbatches(s) for s in range(130)]  # into the third epoch
    for k in (0, 17, 62, 63, 129):
        assert batching.StepSampler(2000, 32, 8, 0, 1, seed=1, **kw).step_microbatches(k) == seen[k]
    assert batching.StepSampler(2000, 32, 8, 0, 1, seed=2, **kw).step_microbatches(0) != seen[0]


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_epochs_start_with_their_longest_row(world):
    """Each epoch's first step holds that epoch's longest row (distinct lengths, so it is one
    row), on one rank or two, as HF's length-grouped sampler does: a run whose longest batch
    does not fit fails at its first step. Ungrouped epochs stay plain permutations."""
    lengths = np.random.default_rng(0).permutation(np.arange(10, 1010)).astype(np.int32)
    steps = 1000 // 32
    for epoch in range(3):
        samplers = [batching.StepSampler(1000, 32, 8, r, world, seed=4, lengths=lengths, group_by_length=True)
                    for r in range(world)]
        used = [i for s in range(epoch * steps, (epoch + 1) * steps) for i in samplers[0].step_indices(s).tolist()]
        first = [i for smp in samplers for mb in smp.step_microbatches(epoch * steps) for i in mb]
        assert int(lengths[first].max()) == int(lengths[used].max()), epoch
        assert len(set(used)) == steps * 32  # still each row once
    plain = batching.StepSampler(1000, 32, 8, 0, 1, seed=4, lengths=lengths)
    g = torch.Generator().manual_seed(4 * 100_003)
    assert plain.step_indices(0).tolist() == torch.randperm(1000, generator=g)[:32].tolist()


def test_a_checkpoint_from_before_longest_first_epochs_resumes_in_its_own_order(tmp_path):
    """A checkpoint's state without `longest_batch_first` was written when grouped epochs did not
    begin with their longest batch: its run goes on in that order (the same batches, the
    longest not moved), so no row is repeated or skipped across the upgrade."""
    from launcher.checkpoint import STATE_FILE, TrainState

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 5, "epoch": 0}))
    state = TrainState.read(tmp_path)
    assert state.longest_batch_first is False and TrainState().longest_batch_first is False
    lengths = np.random.default_rng(1).permutation(np.arange(10, 1010)).astype(np.int32)
    new = batching.StepSampler(1000, 32, 8, 0, 1, seed=4, lengths=lengths, group_by_length=True)
    # as the trainer builds it after loading such a state
    old = batching.StepSampler(1000, 32, 8, 0, 1, seed=4, lengths=lengths, group_by_length=True,
                               longest_first=state.longest_batch_first)
    before = [old.step_indices(s).tolist() for s in range(31)]
    after = [new.step_indices(s).tolist() for s in range(31)]
    assert before != after and sorted(map(tuple, before)) == sorted(map(tuple, after))  # only moved
    moved = [k for k in range(31) if before[k] != after[k]]
    assert moved[0] == 0 and after[0] == before[moved[1]] and after[moved[1]] == before[0]


def test_grouping_cuts_padding_and_keeps_step_order_random():
    lengths = skewed_lengths(20_000)
    grouped = batching.StepSampler(20_000, 32, 32, 0, 1, seed=0, lengths=lengths, group_by_length=True)
    plain = batching.StepSampler(20_000, 32, 32, 0, 1, seed=0, lengths=lengths)
    assert plain.padded_fraction() > 0.5  # a long row in nearly every random batch
    assert grouped.padded_fraction() < 0.1 < plain.padded_fraction() / 5
    # Steps are not in length order: the longest batches are spread over the epoch.
    longest = [int(lengths[grouped.step_microbatches(s)[0]].max()) for s in range(grouped.steps_per_epoch)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # The padded fraction is what the micro-batches really carry.
    slots = real = 0
    for s in range(grouped.steps_per_epoch):
        for mb in grouped.step_microbatches(s):
            slots += len(mb) * int(lengths[mb].max())
            real += int(lengths[mb].sum())
    assert grouped.padded_fraction() == pytest.approx(1 - real / slots)


def test_the_dataloader_feeds_exactly_the_sampler_micro_batches(tmp_path, tok):
    rows = synthetic.generate_clauses(400, seed=1)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = pipeline.prepare(clause_split(path, tok), Cache(tmp_path / "c", "t", True, others_wait=False))
    sampler = batching.StepSampler(len(ds), 32, 8, 1, 2, seed=3, lengths=ds.lengths, group_by_length=True)
    collate = batching.PadCollator(tok.pad_token_id)
    got = list(batching.train_batches(ds, sampler, 5, 20, collate, num_workers=2, pin_memory=False))
    assert [step for step, _ in got] == list(range(5, 20))  # starts where a resumed run starts
    for step, micro in got:
        expected = sampler.step_microbatches(step)
        assert len(micro) == len(expected) == 2
        for (batch, n_tokens), idx in zip(micro, expected):
            want = collate([ds[i] for i in idx])
            assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch["labels"], want["labels"])
            assert n_tokens == int(batch["attention_mask"].sum()) == sum(len(ds[i]["input_ids"]) for i in idx)


# ---------------------------------------------------------------- sources and rows


def test_every_local_source_gives_the_same_token_rows(tmp_path, tok):
    """JSONL, CSV, Parquet, a save_to_disk directory (Dataset and DatasetDict) and a local
    dataset directory standing in for a hub id: the same rows, the same tokens."""
    import datasets

    rows = [{"text": r["text"], "label": int(bool(r["labels"]))} for r in synthetic.generate_clauses(60, seed=4)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "arrow")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:5])}
                         ).save_to_disk(tmp_path / "dict")
    (tmp_path / "hubdir").mkdir()
    write_jsonl(tmp_path / "hubdir" / "train.jsonl", rows)
    write_jsonl(tmp_path / "hubdir" / "validation.jsonl", rows[:5])
    cache = Cache(tmp_path / "cache", "t", True, others_wait=False)
    enc = ClauseEncoder("binary", ["fair", "unfair"], tok, 32)

    def tokens(src):
        ds = pipeline.prepare(pipeline.Split(src, enc, ("input_ids", "labels"), {"t": 1}, check=enc.check), cache)
        return [ds[i] for i in range(len(ds))]

    want = tokens(sources.resolve(DataConfig(train_file=str(jsonl)), "train"))
    assert len(want) == 60 and [r["labels"] for r in want] == [r["label"] for r in rows]
    for name in ("d.csv", "d.parquet", "arrow", "dict"):
        src = sources.resolve(DataConfig(train_file=str(tmp_path / name)), "train")
        assert tokens(src) == want, name
    hub = sources.resolve(DataConfig(hub_dataset=str(tmp_path / "hubdir")), "train")
    assert hub.kind == "hub" and tokens(hub) == want
    # A folder of CSV files reads as data.train_file reads one: an empty `labels` cell (a fair
    # clause) was pandas' NaN there, and every fair row was refused.
    (tmp_path / "hubcsv").mkdir()
    for split, part in (("train", rows), ("validation", rows[:5])):
        datasets.Dataset.from_list([{"text": r["text"], "labels": "[1]" if r["label"] else ""} for r in part]
                                   ).to_csv(tmp_path / "hubcsv" / f"{split}.csv", index=False)
    folder = sources.resolve(DataConfig(hub_dataset=str(tmp_path / "hubcsv")), "train")
    assert tokens(folder) == want and str(folder) == f"{tmp_path / 'hubcsv'}:train"  # (not hubcsv/unfair_tos, no such path)
    assert len(tokens(sources.resolve(DataConfig(validation_file=str(tmp_path / "dict")), "validation"))) == 5
    with pytest.raises(DataError, match=r"has splits train, validation; none is named 'dev'"):
        tokens(sources.resolve(DataConfig(train_file=str(tmp_path / "dict"), train_split="dev"), "train"))


def test_arrow_packing_equals_the_reference_packer():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    ids = [list(range(k)) for k in rng.integers(3, 40, 500).tolist()]
    labels = [[-100] + x[1:] for x in ids]
    table = pa.table({"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]})
    packed = instructions.pack_table(table, 64, "greedy").to_pylist()
    ref_ids, ref_labels, ref_lens = instructions.pack(ids, labels, 64)
    assert [r["input_ids"] for r in packed] == ref_ids
    assert [r["labels"] for r in packed] == ref_labels
    assert [r["seq_lens"] for r in packed] == ref_lens
    assert [r["length"] for r in packed] == [len(x) for x in ref_ids]


def test_best_fit_decreasing_packs_every_example_once_into_fewer_blocks():
    import pyarrow as pa

    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 120, 3000).tolist()
    ids = [[i] * n for i, n in enumerate(lengths)]  # each token names its example
    table = pa.table({"input_ids": ids, "labels": ids, "length": lengths})
    bfd = instructions.pack_table(table, 128, "bfd").to_pylist()
    greedy = instructions.greedy_plan(lengths, 128)
    assert bfd == instructions.pack_table(table, 128, "bfd").to_pylist()  # deterministic
    assert all(r["length"] == sum(r["seq_lens"]) <= 128 for r in bfd)
    seen = []
    for r in bfd:  # examples stay whole and contiguous, each exactly once
        start = 0
        for n in r["seq_lens"]:
            (example,) = set(r["input_ids"][start : start + n])
            assert lengths[example] == n
            seen.append(example)
            start += n
    assert sorted(seen) == list(range(3000))
    total = sum(lengths)
    assert len(bfd) < 0.9 * len(greedy) and total / (128 * len(bfd)) > 0.97


def test_bad_rows_at_scale_are_reported_by_file_and_line(tmp_path, tok):
    """50,000 rows tokenized in 2 processes, 13 bad ones among them: the first 10 by file:line
    (blank lines counted), then a count; nothing is left in the cache."""
    rows = synthetic.generate_clauses(50_000, seed=2)
    bad_at = sorted(np.random.default_rng(1).choice(50_000, 13, replace=False).tolist())
    lines, expected = [], []
    for i, r in enumerate(rows):
        if i == 100:
            lines.append("")  # a blank line shifts every later line number by one
        lines.append(json.dumps({"text": r["text"]} if i in bad_at else r))
        if i in bad_at:
            expected.append(f"{tmp_path / 'big.jsonl'}:{len(lines)}: needs exactly one of 'label' or 'labels'")
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cache = Cache(tmp_path / "cache", "t", True, others_wait=False)
    with pytest.raises(DataError) as e:
        pipeline.prepare(clause_split(path, tok), cache, num_proc=2)
    assert e.value.problems == expected[:10] + [f"{path}: 3 more bad rows not shown"]
    assert not list((tmp_path / "cache").glob("tokens-*")), "a failed build leaves no entry and no lock"


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n', ":2: not valid UTF-8 (byte 14 of the line)"),
    (b'{"text": "ok", "label": 0}\n{"text": "cut', ":2: not valid JSON"),
])
def test_unreadable_lines_are_reported_by_file_and_line(tmp_path, tok, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        pipeline.prepare(clause_split(path, tok), Cache(tmp_path / "c", "t", True, others_wait=False))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"{path}{message}")


def test_a_file_that_is_not_parquet_is_one_line(tmp_path, tok):
    path = tmp_path / "d.parquet"
    path.write_text("text,label\nhello,0\n")
    with pytest.raises(DataError) as e:
        pipeline.prepare(clause_split(path, tok), Cache(tmp_path / "c", "t", True, others_wait=False))
    (line,) = e.value.problems
    assert line.startswith(f"{path}: not a readable Parquet file")


def test_rows_are_memory_mapped_not_python_lists(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", synthetic.generate_clauses(2000, seed=1))
    ds = pipeline.prepare(clause_split(path, tok), Cache(tmp_path / "c", "t", True, others_wait=False))
    table = ds.ds.data
    assert type(table).__name__ == "MemoryMappedTable"
    assert ds.lengths.dtype == np.int32 and ds.lengths.nbytes == 4 * 2000  # the only per-row index in memory


# ---------------------------------------------------------------- one builder per cache


def _race(root: str, token: str, candidate: bool, fail: bool, out):
    def build(tmp, stage):
        stage("tokenizing")
        time.sleep(0.5)
        if fail:
            raise DataError("x.jsonl:3: missing or empty 'text'")
        (tmp / "rows").write_text(str(os.getpid()))

    try:
        path, built = Cache(root, token, candidate, say=lambda s: None, poll_s=0.05).get("tokens", {"k": 1}, build)
        out.put(("ok", built, (path / "rows").read_text()))
    except DataError as e:
        out.put(("error", e.problems))


def test_a_candidate_that_takes_the_lock_just_after_another_built_the_entry_does_not_build_it_again(tmp_path):
    """Between a candidate's look for the entry and its look at the lock, another process built
    the entry and removed its lock: the candidate took the free lock and built it a second
    time (seen under load as two builders in the race test below)."""
    built = []

    def build(tmp, stage):
        built.append(1)
        (tmp / "rows").write_text("x")

    class Late(Cache):
        def _read_text(self, lock):
            if not built:  # the other process finishes right now
                Cache(str(tmp_path), "job", True, say=lambda s: None).get("tokens", {"k": 1}, build)
            return super()._read_text(lock)

    path, built_here = Late(str(tmp_path), "job", True, say=lambda s: None, poll_s=0.01).get("tokens", {"k": 1}, build)
    assert (path / "rows").read_text() == "x" and not built_here and len(built) == 1
    assert not list(tmp_path.glob("*.lock"))


def test_one_process_builds_and_the_others_wait_or_share_its_error(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for fail in (False, True):
        out = ctx.Queue()
        root = str(tmp_path / ("fail" if fail else "ok"))
        procs = [ctx.Process(target=_race, args=(root, "job", r in (0, 2), fail, out)) for r in range(4)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        if not fail:
            assert sorted(r[1] for r in results) == [False, False, False, True]  # exactly one built
            assert len({r[2] for r in results}) == 1  # and everyone reads its entry
        else:
            assert all(r == ("error", ["x.jsonl:3: missing or empty 'text'"]) for r in results)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = "tokens-" + __import__("launcher.data.cache", fromlist=["key_of"]).key_of({"k": 1})
    (tmp_path / f"{name}.lock").write_text(json.dumps({"token": "old-job", "host": os.uname().nodename, "pid": dead.pid}))
    path, built = Cache(tmp_path, "new-job", True, poll_s=0.01).get("tokens", {"k": 1}, lambda tmp, stage: None)
    assert built and path.is_dir() and not (tmp_path / f"{name}.lock").exists()


# ---------------------------------------------------------------- end to end


def run_train(out: Path, name: str, config: Path, *extra: str):
    return check(launcher("train", str(config), "--output-dir", str(out), "--run-name", name, *extra))


@pytest.mark.slow
@pytest.mark.parametrize("task", [pytest.param("classification", marks=pytest.mark.matrix), "causal_lm"])
def test_save_to_disk_and_local_hub_directory_train_like_jsonl(tmp_path, task):
    """The same rows as JSONL files, as a save_to_disk DatasetDict, and as a local dataset
    directory passed where a hub id goes: identical runs (same final metrics, same weights)."""
    import datasets
    from safetensors.torch import load_file

    if task == "classification":
        config, base = TINY, FAST + ["train.max_steps=6", "eval.every_steps=0", "checkpoint.every_steps=0"]
        train, val = synthetic.generate_clauses(384, seed=0), synthetic.generate_clauses(100, seed=1)
    else:
        config = SFT
        base = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "train.max_steps=4",
                "eval.every_steps=0", "checkpoint.every_steps=0", "eval.max_new_tokens=4"]
        train, val = instructions.generate_instructions(128, 0), instructions.generate_instructions(24, 1)
        # Arrow needs one schema per column: chat rows carry `messages`, the others `instruction`.
    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", train)
    write_jsonl(files / "validation.jsonl", val)
    datasets.DatasetDict({"train": datasets.load_dataset("json", data_files=str(files / "train.jsonl"), split="train"),
                          "validation": datasets.load_dataset("json", data_files=str(files / "validation.jsonl"), split="train")}
                         ).save_to_disk(tmp_path / "arrow")
    off = ["data.synthetic.enabled=false"]
    run_train(tmp_path, "jsonl", config, *base, *off, f"data.train_file={files / 'train.jsonl'}",
              f"data.validation_file={files / 'validation.jsonl'}")
    run_train(tmp_path, "saved", config, *base, *off, f"data.train_file={tmp_path / 'arrow'}",
              f"data.validation_file={tmp_path / 'arrow'}")
    run_train(tmp_path, "hub", config, *base, *off, f"data.hub_dataset={files}")
    results = {n: json.loads((tmp_path / n / "final_metrics.json").read_text())["after"] for n in ("jsonl", "saved", "hub")}
    assert results["saved"] == results["jsonl"] == results["hub"]
    ref = load_file(tmp_path / "jsonl" / "model" / "model.safetensors")
    for name in ("saved", "hub"):
        other = load_file(tmp_path / name / "model" / "model.safetensors")
        assert all(torch.equal(ref[k], other[k]) for k in ref), name


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_tokenize_once_and_a_second_run_reuses_the_cache(tmp_path):
    """Two ranks: rank 0 tokenizes, rank 1 waits and memory-maps its result; a second job on
    the same files reads the cache on both ranks and trains identically."""
    from safetensors.torch import load_file

    from test_distributed import ACCEL, accelerate_launch, check_ranks

    data = tmp_path / "data"
    check(launcher("synth", str(data), "--n-train", "384", "--n-validation", "100"))
    extra = ["data.synthetic.enabled=false", f"data.train_file={data / 'train.jsonl'}",
             f"data.validation_file={data / 'validation.jsonl'}", "train.max_steps=4", "eval.every_steps=0",
             "checkpoint.every_steps=0"]
    launch = ["--config_file", str(ACCEL / "cpu_ddp.yaml")]
    first = check(accelerate_launch(launch, tmp_path, "a", *extra, base=FAST))
    assert "padding:" in first.stdout and "length-grouped" in first.stdout
    facts = check_ranks(tmp_path / "a")
    assert [f["tokenized_here"] for f in facts] == [{"train": True, "validation": True}, {"train": False, "validation": False}]
    check(accelerate_launch(launch, tmp_path, "b", *extra, base=FAST))
    facts = check_ranks(tmp_path / "b")
    assert [f["tokenized_here"] for f in facts] == [{"train": False, "validation": False}] * 2
    a, b = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / ".cache").glob("*.lock")) and not list((tmp_path / ".cache").glob("*.tmp-*"))


def _name(parts: dict) -> str:
    return "tokens-" + __import__("launcher.data.cache", fromlist=["key_of"]).key_of(parts)


def test_a_silent_lock_from_another_host_is_taken_over_with_one_line(tmp_path):
    """A builder killed on another node leaves a lock no pid check can judge: once it has not
    changed for stale_after_s (the waiter's clock), it is taken over, and the line names it."""
    lock = tmp_path / f"{_name({'k': 1})}.lock"
    lock.write_text(json.dumps({"token": "old-job", "host": "node-that-died", "pid": 1, "who": "rank 8 (host node-that-died, pid 1)"}))
    said = []
    path, built = Cache(tmp_path, "new-job", True, say=said.append, poll_s=0.05, stale_after_s=0.5).get(
        "tokens", {"k": 1}, lambda tmp, stage: (tmp / "rows").write_text("x"))
    assert built and (path / "rows").read_text() == "x" and not lock.exists()
    (line,) = [s for s in said if s.startswith("taking over")]
    assert re.fullmatch(rf"taking over {re.escape(lock.name)}, left by rank 8 \(host node-that-died, pid 1\) \(unchanged for \d+ s\)", line)
    assert not list(tmp_path.glob("*.stale-*"))


def _slow_builder(root: str, out):
    def build(tmp, stage):
        time.sleep(5.0)  # 2.5 times stale_after_s: only the heartbeat keeps the lock alive
        (tmp / "rows").write_text(str(os.getpid()))

    path, built = Cache(root, "job-a", True, say=lambda s: None, poll_s=0.05, heartbeat_s=0.1, stale_after_s=2.0).get(
        "tokens", {"k": 1}, build)
    out.put(("a", built, (path / "rows").read_text()))


def test_a_live_builder_keeps_its_lock_by_beating_and_a_silent_one_of_this_job_stops_the_wait(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    builder = ctx.Process(target=_slow_builder, args=(str(tmp_path / "c"), out))
    builder.start()
    lock = tmp_path / "c" / f"{_name({'k': 1})}.lock"
    deadline = time.monotonic() + 30
    while not lock.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    said = []
    # (a 2 s silence, twenty beats, would be needed to take over: a loaded machine's pauses are shorter)
    path, built = Cache(tmp_path / "c", "job-b", True, say=said.append, poll_s=0.05, stale_after_s=2.0).get(
        "tokens", {"k": 1}, lambda tmp, stage: (tmp / "rows").write_text("b"))
    assert out.get(timeout=30) == ("a", True, str(builder.pid))
    builder.join(10)
    assert not built and (path / "rows").read_text() == str(builder.pid)
    assert not [s for s in said if s.startswith("taking over")]
    # A lock of this very job that stops changing: its builder hung; the wait ends in one line.
    hung = tmp_path / "h" / f"{_name({'k': 2})}.lock"
    hung.parent.mkdir(mode=0o700)
    hung.write_text(json.dumps({"token": "job-c", "host": "h", "pid": 1, "who": "rank 0 (host h, pid 1)"}))
    from launcher.errors import RunError

    with pytest.raises(RunError, match=r"rank 0 \(host h, pid 1\) building .* has shown no sign of life for \d+ s"):
        Cache(tmp_path / "h", "job-c", False, poll_s=0.05, stale_after_s=0.3).get("tokens", {"k": 2}, None)


def test_a_cache_root_is_private_and_an_entry_is_checked_before_use(tmp_path):
    from launcher.errors import ConfigError

    root = tmp_path / "new" / "cache"
    Cache(root, "t", True, others_wait=False)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    shared = tmp_path / "team"
    Cache(shared, "t", True, others_wait=False, shared=True)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2770
    os.chown(shared, 54321, os.getgid())  # a teammate's, in our group: used when declared shared
    Cache(shared, "t", True, others_wait=False, shared=True)
    with pytest.raises(ConfigError, match="belongs to another user"):
        Cache(shared, "t", True, others_wait=False)
    os.chmod(shared, 0o2777)
    with pytest.raises(ConfigError, match=r"may be written by anyone \(mode 2777\)"):
        Cache(shared, "t", True, others_wait=False, shared=True)
    # An entry that does not hold what its name says (planted, or from another key) is refused.
    cache = Cache(root, "t", True, others_wait=False)
    path, built = cache.get("tokens", {"k": 1}, lambda tmp, stage: (tmp / "rows").write_text("x"))
    assert built and json.loads((path / "launcher-key.json").read_text())["key"] == {"k": 1}
    assert cache.get("tokens", {"k": 1}, None) == (path, False)
    (path / "launcher-key.json").write_text(json.dumps({"key": {"k": 2}}))
    with pytest.raises(ConfigError, match="does not hold what its name says"):
        cache.get("tokens", {"k": 1}, None)


def test_a_builder_that_was_taken_over_leaves_its_successors_lock_alone(tmp_path):
    """A builder paused past stale_after_s (a suspended job, a stalled file system) finds another
    holder in its lock when it resumes: it neither beats into that lock nor removes it."""
    lock = tmp_path / f"{_name({'k': 1})}.lock"
    successor = json.dumps({"token": "job-b", "host": "h2", "pid": 2, "nonce": "theirs", "who": "rank 0 (host h2, pid 2)"})

    def build(tmp, stage):
        lock.write_text(successor)  # taken over while this builder was paused
        time.sleep(0.3)  # heartbeats come due
        stage("writing")
        (tmp / "rows").write_text("x")

    path, built = Cache(tmp_path, "job-a", True, say=lambda s: None, heartbeat_s=0.05, others_wait=True).get(
        "tokens", {"k": 1}, build)
    assert built and (path / "rows").read_text() == "x"
    assert lock.read_text() == successor
