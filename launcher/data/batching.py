"""Batches: pad per micro-batch, and choose each optimizer step's examples for every rank.

The train sampler is a pure function of (seed, epoch, step): the global batch for
step s is the same examples whatever the world size, and each rank takes a
contiguous slice of it. So "data position" after a resume is derived from the
step alone, and a 2-rank run sees exactly the batches a 1-rank run sees. With
length grouping, the global batches are made of examples of similar length
(still a pure function of seed, epoch and the lengths), so every rank's
micro-batches carry little padding.

Tokenizing and caching live in data/pipeline.py and data/cache.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

MEGABATCH = 50  # global batches sorted together; HF Trainer's LengthGroupedSampler uses 50 too


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        text = f"{tokenizer.name_or_path}:{len(tokenizer)}"
    else:
        # The backend's JSON records the truncation/padding of its last call: leave those out,
        # or the fingerprint (and the cache key) changes as soon as the tokenizer is used.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    # What tokenizer_config.json holds beside the backend: the EOS a prompt ends an answer with,
    # the BOS it starts with, which side a cut takes (an EOS fixed there kept the old one's ids).
    around = {"special": tokenizer.special_tokens_map, "truncation_side": getattr(tokenizer, "truncation_side", None),
              "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None)}
    text += json.dumps(around, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PadCollator:
    """Dynamic padding: each batch is padded to its own longest row."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        each = [r["labels"] for r in rows]
        labels = torch.stack(each) if isinstance(each[0], torch.Tensor) else torch.tensor(each)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Optimizer steps in an epoch of n rows: the tail that does not fill a global batch is dropped."""
    return n // global_batch


class StepSampler:
    """Micro-batches of one rank for optimizer steps [start_step, ...), epoch after epoch.

    Each epoch is a permutation seeded by (seed, epoch); the tail that does not fill
    a whole global batch is dropped, so every step has exactly global_batch examples.
    With `lengths` and group_by_length, the epoch's permutation is cut into mega-batches
    of MEGABATCH global batches, each sorted by length (longest first), and the global
    batches are then shuffled with the same seed: similar lengths share a micro-batch,
    while the order of steps stays random, except that the global batch holding the epoch's
    longest row comes first. The epoch's order is built once and kept.
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, rank: int, world: int, seed: int,
                 lengths: np.ndarray | None = None, group_by_length: bool = False, longest_first: bool = True):
        if global_batch % (micro_batch * world):
            raise ValueError("global batch must divide by micro batch x world size")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.steps_per_epoch = steps_per_epoch(n, global_batch)
        self.accumulation = global_batch // (micro_batch * world)
        # int32, shared with the dataset's own index when it is int32 already: one copy per rank.
        self.lengths = None if lengths is None else torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32))
        self.group_by_length = group_by_length and lengths is not None
        # False: the grouped order of checkpoints written before epochs began with their longest
        # batch (a resume across that change keeps the order it was written with).
        self.longest_first = longest_first
        self._orders: dict[int, torch.Tensor] = {}

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's order, built once. Two epochs are kept: the loader's workers run ahead
        into the next epoch while the step (step_indices) still reads this one."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = self._build_order(epoch)
        return self._orders[epoch]

    def _build_order(self, epoch: int, group: bool | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g)
        if not (self.group_by_length if group is None else group) or self.steps_per_epoch == 0 or self.lengths is None:
            return order
        steps, size = self.steps_per_epoch, self.global_batch
        order = order[: steps * size]
        mega = MEGABATCH * size
        chunks = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunks.append(chunk[torch.argsort(-self.lengths[chunk], stable=True)])
        batches = torch.cat(chunks).view(steps, size)[torch.randperm(steps, generator=g)]
        # The global batch with the epoch's longest row goes first (HF's LengthGroupedSampler
        # does so too): a run whose longest micro-batch does not fit in memory fails at its
        # first step, not hours in, and the allocator's first touch of the largest activations
        # (0.8-1 s per new largest shape for SmolLM2 on CPU) is paid once, at the start.
        if self.longest_first:
            first = int(self.lengths[batches].max(1).values.argmax())
            batches[[0, first]] = batches[[first, 0]]
        return batches.reshape(-1)

    def step_indices(self, step: int) -> torch.Tensor:
        """The whole global batch of (0-based) optimizer step `step`, every rank's rows in rank
        order: the same tensor on every rank and under any world size."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch]

    def moved_from(self, was: int, step: int) -> str:
        """Where a run that took `step` steps of `was` rows goes on in this order of another
        global batch (the position is step x batch, and a grouped order is cut by the batch):
        the rows of the checkpoint's epoch it skips and reads again, counted, or the epoch it
        goes on in. Empty when the batch is the same or no epoch holds one."""
        if was == self.global_batch or not step or not steps_per_epoch(self.n, was) or not self.steps_per_epoch:
            return ""
        old = StepSampler(self.n, was, was, 0, 1, self.seed, None if self.lengths is None else self.lengths.numpy(),
                          self.group_by_length, self.longest_first)
        old_epoch, old_at = divmod(step, old.steps_per_epoch)
        new_epoch, new_at = divmod(step, self.steps_per_epoch)
        seen = old.epoch_order(old_epoch)[: old_at * was].numpy()
        if new_epoch != old_epoch:
            return (f"the data goes on in epoch {new_epoch + 1} of batches of {self.global_batch}, where the checkpoint "
                    f"was {len(seen):,} rows into epoch {old_epoch + 1}")
        due = old.epoch_order(old_epoch)[: old.steps_per_epoch * was].numpy()  # what that epoch would have read
        ahead = self.epoch_order(new_epoch)[new_at * self.global_batch : self.steps_per_epoch * self.global_batch].numpy()
        skipped = int((~np.isin(due, seen) & ~np.isin(due, ahead)).sum())
        again = int(np.isin(ahead, seen).sum())
        return (f"the data goes on at step {step + 1}'s place in batches of {self.global_batch}: of epoch "
                f"{old_epoch + 1}'s rows, {skipped:,} are skipped and {again:,} read again")

    def step_microbatches(self, step: int) -> list[list[int]]:
        """Index lists for this rank's micro-batches of (0-based) optimizer step `step`."""
        per_rank = self.global_batch // self.world
        mine = self.step_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def microbatch_index(self, k: int) -> int:
        """Position of this rank's k-th micro-batch within the global batch, the same under any world size."""
        return self.rank * self.accumulation + k

    def epochs_done(self, steps: int) -> float:
        """Epochs completed after `steps` optimizer steps (1.0 at the end of the first), as logged."""
        return round(steps / self.steps_per_epoch, 6)

    def padded_fraction(self, epoch: int = 0, grouped: bool | None = None) -> float:
        """Padding / all token slots over one epoch's micro-batches of every rank (each is
        padded to its longest row). The same under any world size: ranks hold contiguous
        micro-batch-sized slices of the global batch. grouped=False: what random batches
        of the same seed would carry (the comparison the run prints)."""
        if self.lengths is None or self.steps_per_epoch == 0:
            return 0.0
        order = self.epoch_order(epoch) if grouped in (None, self.group_by_length) else self._build_order(epoch, grouped)
        order = order[: self.steps_per_epoch * self.global_batch]
        per_micro = self.lengths[order].view(-1, self.micro_batch)
        slots = per_micro.max(1).values.long().sum() * self.micro_batch
        return float(1 - per_micro.long().sum() / slots)


class StepBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: this rank's micro-batches for steps [start, end), in order."""

    def __init__(self, sampler: StepSampler, start: int, end: int):
        self.sampler, self.start, self.end = sampler, start, end

    def __iter__(self):
        for step in range(self.start, self.end):
            yield from self.sampler.step_microbatches(step)

    def __len__(self) -> int:
        return (self.end - self.start) * self.sampler.accumulation


class CountTokens:
    """Wraps a collator: (batch, real tokens in it), counted before padding."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows: list[dict]):
        return self.collate(rows), sum(len(r["input_ids"]) for r in rows)


def _leave_stops_to_training(_worker_id: int) -> None:
    """A loader worker shares the training process's process group, which a terminal's Ctrl-C
    (SIGINT), a scheduler's preemption (Slurm SIGTERMs every process of the job) and
    `kill -TERM -PGID` all signal. Each is the training process's to handle (a stop at the end
    of the step), not a reason for the worker to die under it: a worker killed by a signal
    raises in the training process, mid-step, with a traceback and no checkpoint. The worker
    still ends with its loader (train_batches stops it on every way out), or within seconds
    of the training process dying (torch's worker watchdog, between batches)."""
    import signal

    from launcher.preemption import STOP_SIGNALS

    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # (ignored, the stops write nothing there; the socket is the training process's)


def train_batches(dataset, sampler: StepSampler, start: int, end: int, collate, num_workers: int, pin_memory: bool):
    """Yields (step, [(micro-batch, real tokens), ...]) for steps [start, end): exactly the
    micro-batches the step sampler chooses, collated by worker processes (prefetching
    while the model computes) and pinned for a fast copy to the GPU."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(sampler, start, end), collate_fn=CountTokens(collate),
        num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
        persistent_workers=False, worker_init_fn=_leave_stops_to_training,
    )
    it = iter(loader)
    try:
        for step in range(start, end):
            yield step, [next(it) for _ in range(sampler.accumulation)]
    finally:
        # Every way out (the last step, close(), an error in a worker or in the step) stops the
        # workers here. Left to the interpreter's exit, which SIGTERMs daemon processes and then
        # waits for them, workers that ignore SIGTERM (_leave_stops_to_training) would hang it;
        # and an error's traceback keeps the iterator alive until then. torch's own shutdown
        # (done event, join, then terminate) is a method of its multi-process iterator only.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
