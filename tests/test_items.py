"""A step's item count (what the token-exact loss divides by) is summed from the rows the step
holds (task.row_items): every rank knows them all, so no collective counts it. It must equal
what every rank's collated micro-batches hold (task.loss_items, summed over ranks: the
all-reduce it replaces), for padded, packed and flattened instruction rows and for
class-weighted clauses, under any number of ranks. (Every training run of the suite also
checks this on every step: trainer.CHECK_ITEMS.)"""

from __future__ import annotations

import datasets
import pytest
import torch

from launcher import tasks
from launcher.config import load_config
from launcher.data import batching, instructions
from launcher.data.cache import Cache
from launcher.data.instructions import IGNORE, LMCollator

from conftest import CONFIGS, TINY, task_tokenizer

SFT = CONFIGS / "train" / "sft_tiny.yaml"


def _rows_of(task, tmp_path):
    """The task's training rows as a run prepares them (tokenizer, encoder, packing, cache)."""
    train_file, val_file = task.write_synthetic(tmp_path / "data")
    train_src, val_src = task.sources(train_file, val_file)
    import json

    rows = [json.loads(line) for line in open(train_file)]
    tok = task_tokenizer(task, tmp_path, rows)
    cache = Cache(tmp_path / "cache", "test", candidate=True, others_wait=False)
    train_ds, _ = task.datasets(train_src, val_src, tok, cache)
    return tok, train_ds


def _counted_by_ranks(task, ds, collate, step: int, world: int, global_batch: int, micro: int) -> float:
    """What the all-reduce summed: each rank's collated micro-batches of the step."""
    total = 0.0
    for rank in range(world):
        sampler = batching.StepSampler(len(ds), global_batch, micro, rank, world, seed=3, lengths=ds.lengths,
                                       group_by_length=True)
        total += sum(task.loss_items(collate(ds.__getitems__(mb))) for mb in sampler.step_microbatches(step))
    return total


@pytest.mark.parametrize("packing,flatten", [(False, False), (True, False), (True, True)])
def test_instruction_rows_count_their_predicted_response_tokens(tmp_path, packing, flatten):
    cfg = load_config(SFT, [f"data.packing={str(packing).lower()}", "data.synthetic.n_train=96",
                            "data.synthetic.n_validation=8", "data.max_length=64"])
    task = tasks.for_config(cfg)
    tok, ds = _rows_of(task, tmp_path)
    items = task.row_items(ds)
    assert items.dtype == torch.float64 and len(items) == len(ds) and bool((items > 0).all())
    collate = LMCollator(tok.pad_token_id, packed=packing, flatten=flatten)
    ref = batching.StepSampler(len(ds), 8, 2, 0, 1, seed=3, lengths=ds.lengths, group_by_length=True)
    for step in range(ref.steps_per_epoch + 1):  # into the second epoch
        sync_free = float(items[ref.step_indices(step)].sum())
        for world in (1, 2, 4):
            assert _counted_by_ranks(task, ds, collate, step, world, 8, 2) == sync_free, (step, world)


def test_an_examples_first_token_is_not_counted_anywhere_in_a_packed_row():
    """Rows built by hand: a labelled first token (a response with no prompt) is not a target,
    whether it starts the row or follows another example in it; a block of rows is counted
    with the offsets of its own slice."""
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    labels = [[5, 6, 7], [IGNORE, 9], [10, IGNORE, 12, 13]]  # every example's first token labelled but one
    packed = datasets.Dataset.from_dict({"input_ids": [ids[0] + ids[1], ids[2]], "labels": [labels[0] + labels[1], labels[2]],
                                         "seq_lens": [[3, 2], [4]]})
    want = [2 + 1, 2]
    for rows in (1, 2):  # the longest row has 5 tokens
        assert instructions.response_items(packed, tokens_per_block=5 * rows).tolist() == want
    batch = LMCollator(0, packed=True)(list(packed))
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == sum(want)


def test_class_weighted_clauses_count_their_weights(tmp_path):
    cfg = load_config(TINY, ["train.class_weighting=balanced", "data.synthetic.n_train=96",
                             "data.synthetic.n_validation=8"])
    task = tasks.for_config(cfg)
    tok, ds = _rows_of(task, tmp_path)
    task.prepare(ds, torch.device("cpu"))
    items = task.row_items(ds)
    assert len(set(items.tolist())) == 2  # two classes, two weights
    collate = task.collator(tok)
    ref = batching.StepSampler(len(ds), 16, 4, 0, 1, seed=3, lengths=ds.lengths, group_by_length=True)
    for step in range(ref.steps_per_epoch):
        sync_free = float(items[ref.step_indices(step)].sum())
        for world in (2, 4):
            assert _counted_by_ranks(task, ds, collate, step, world, 16, 4) == pytest.approx(sync_free, rel=1e-12)
