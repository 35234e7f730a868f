"""The peers `benchmarks/throughput.py` runs the launcher against, one process each:

    python benchmarks/_contenders.py raw     --model DIR --data FILE --steps N --batch B --max-length L
    python benchmarks/_contenders.py trainer --model DIR --data FILE --steps N --batch B --max-length L [--grouped]

`raw` is the minimal loop a person writes by hand: tokenize, a shuffled DataLoader that
pads each batch to its longest row, AdamW (fused where torch has it), forward, backward,
step. `trainer` is HF `Trainer` with its defaults (random batches; --grouped: its
length-grouped sampler), the same model, optimizer settings and batch. Both print one
JSON line last: seconds from process start to the end of the first optimizer step, each
later step's seconds, and the non-pad tokens they trained on.
"""

from __future__ import annotations

import time

T0 = time.time()  # before the heavy imports: they are part of what the peers cost

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402


def read_clauses(path: str) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(int(row["label"]))
    return texts, labels


def raw(args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    texts, labels = read_clauses(args.data)
    enc = tok(texts, truncation=True, max_length=args.max_length)
    rows = [(ids, y) for ids, y in zip(enc["input_ids"], labels)]

    def collate(batch):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (row, _) in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask, torch.tensor([y for _, y in batch])

    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    model.train()
    first, times, tokens, padded = None, [], 0, 0
    step = 0
    while step < args.steps:
        for ids, mask, y in loader:
            t = time.time()
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens, padded = tokens + int(mask.sum()), padded + mask.numel()
            if first is None:
                first = time.time() - T0
            else:
                times.append(time.time() - t)
            if step == args.steps:
                break
    return {"first_step_s": first, "step_times": times, "nonpad_tokens": tokens, "padded_fraction": 1 - tokens / padded}


def trainer(args) -> dict:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    texts, labels = read_clauses(args.data)
    enc = tok(texts, truncation=True, max_length=args.max_length)
    rows = [{"input_ids": ids, "attention_mask": m, "labels": y}
            for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.first, self.times, self.t = None, [], None

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, a, state, control, **kw):
            if self.first is None:
                self.first = time.time() - T0
            else:
                self.times.append(time.time() - self.t)

    tokens = {"n": 0, "padded": 0}
    collate = DataCollatorWithPadding(tok)

    def counting(features):
        batch = collate(features)
        tokens["n"] += int(batch["attention_mask"].sum())
        tokens["padded"] += batch["attention_mask"].numel()
        return batch

    clock = Clock()
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
                              logging_steps=args.steps, save_strategy="no", report_to=[], seed=args.seed, use_cpu=True,
                              disable_tqdm=True,
                              train_sampling_strategy="group_by_length" if args.grouped else "random")
    Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting, callbacks=[clock]).train()
    return {"first_step_s": clock.first, "step_times": clock.times, "nonpad_tokens": tokens["n"],
            "padded_fraction": 1 - tokens["n"] / max(tokens["padded"], 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["raw", "trainer"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--grouped", action="store_true")
    p.add_argument("--out", default="bench-trainer-out")
    args = p.parse_args()
    result = raw(args) if args.kind == "raw" else trainer(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
