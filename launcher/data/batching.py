"""Tokenize once (cached on disk), pad per batch, and shard optimizer steps across ranks.

The train sampler is a pure function of (seed, epoch, step): the global batch for
step s is the same examples whatever the world size, and each rank takes a
contiguous slice of it. So "data position" after a resume is derived from the
step alone, and a 2-rank run sees exactly the batches a 1-rank run sees.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

CACHE_VERSION = 1


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
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(texts: list[str], targets: list, tokenizer, max_length: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{tokenizer_fingerprint(tokenizer)}:{max_length}".encode())
    for text, target in zip(texts, targets):
        h.update(text.encode())
        h.update(repr(target).encode())
    return h.hexdigest()[:24]


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: list[list[int]], targets: torch.Tensor, from_cache: bool = False):
        self.input_ids = input_ids
        self.targets = targets
        self.from_cache = from_cache  # read from the token cache rather than tokenized here

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.targets[i]}


def tokenize(texts, targets, tokenizer, max_length: int, cache_dir: str | Path | None) -> TokenizedDataset:
    """Tokenize with truncation; reuse `cache_dir/<key>.pt` when the same data was seen before.

    Call under the runtime's main-process-first context: rank 0 writes the cache,
    the others then read it instead of tokenizing again.
    """
    targets_t = torch.tensor(targets, dtype=torch.long if isinstance(targets[0], int) else torch.float)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"tokenized-{cache_key(texts, targets, tokenizer, max_length)}.pt"
        if path.is_file():
            return TokenizedDataset(torch.load(path)["input_ids"], targets_t, from_cache=True)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"input_ids": ids}, tmp)
        tmp.replace(path)
    return TokenizedDataset(ids, targets_t)


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
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([r["labels"] for r in rows])}


class StepSampler:
    """Micro-batches of one rank for optimizer steps [start_step, ...), epoch after epoch.

    Each epoch is a permutation seeded by (seed, epoch); the tail that does not fill
    a whole global batch is dropped, so every step has exactly global_batch examples.
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, rank: int, world: int, seed: int):
        if global_batch % (micro_batch * world):
            raise ValueError("global batch must divide by micro batch x world size")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.steps_per_epoch = n // global_batch
        self.accumulation = global_batch // (micro_batch * world)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def step_microbatches(self, step: int) -> list[list[int]]:
        """Index lists for this rank's micro-batches of (0-based) optimizer step `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        per_rank = self.global_batch // self.world
        start = pos * self.global_batch + self.rank * per_rank
        mine = order[start : start + per_rank].tolist()
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def microbatch_index(self, k: int) -> int:
        """Position of this rank's k-th micro-batch within the global batch, the same under any world size."""
        return self.rank * self.accumulation + k

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
