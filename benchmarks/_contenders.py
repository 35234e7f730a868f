"""The peers `benchmarks/throughput.py` runs the launcher against, one process each:

    python benchmarks/_contenders.py raw     --model DIR --data FILE --steps N --batch B --max-length L
    python benchmarks/_contenders.py trainer --model DIR --data FILE --steps N --batch B --max-length L [--grouped]
    python benchmarks/_contenders.py raw_sft|trainer_sft|trl --model DIR --data FILE ... [--packing] [--grouped] [--lora]

`raw` is the minimal loop a person writes by hand: tokenize, a shuffled DataLoader that
pads each batch to its longest row, AdamW (fused where torch has it), forward, backward,
step. `trainer` is HF `Trainer` with its defaults (random batches; --grouped: its
length-grouped sampler), the same model, optimizer settings and batch.

The SFT peers train a causal LM on instruction rows {"instruction", "input", "output"}
rendered with the launcher's default (Alpaca) prompt, or on conversational prompt/completion
rows rendered by the model's chat template, loss on the response and EOS (or end of turn) only:
`raw_sft` by hand (labels -100 on the prompt and on padding), `trainer_sft` through
`Trainer` with `DataCollatorForSeq2Seq`, and `trl` through TRL's `SFTTrainer` on
prompt-completion rows (--packing: its best-fit-decreasing packing, padding-free), in
fp32 without activation checkpointing like the others (SFTConfig defaults to both on).

Each prints one JSON line last: seconds from process start to the end of the first
optimizer step, each later step's seconds, and each step's non-pad tokens (a Trainer's
collator may run a batch ahead: the counts are cut at the step count).
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


PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_instructions(rows: list[dict], tok=None) -> list[tuple[str, str]]:
    """(prompt, response) texts: Alpaca rows rendered as the launcher renders them by default;
    conversational prompt/completion rows (lists of messages) by the tokenizer's chat template,
    the response being what the template adds after the generation prompt (the answer and its
    end-of-turn marker)."""
    pairs = []
    for row in rows:
        if isinstance(row.get("prompt"), list):
            prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            assert full.startswith(prompt), "the chat template renders the prompt differently inside a conversation"
            pairs.append((prompt, full[len(prompt):]))
        else:
            template = PROMPT if row.get("input") else PROMPT_NO_INPUT
            pairs.append((template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]))
    return pairs


def sft_rows(tok, path: str, max_length: int) -> list[dict]:
    """input_ids = BOS + prompt + response + EOS, labels -100 over BOS and the prompt, cut at max_length."""
    rows, records = [], read_rows(path)
    chat = isinstance(records[0].get("prompt"), list)  # conversational rows: the chat template renders them
    for prompt, response in read_instructions(records, tok):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        if not chat:  # the template's end-of-turn marker ends a chat answer; EOS a bare one
            p, r = [tok.bos_token_id] + p, r + [tok.eos_token_id]
        rows.append({"input_ids": (p + r)[:max_length], "labels": ([-100] * len(p) + r)[:max_length]})
    return rows


def lora_config(args):
    """LoRA as the launcher's SmolLM2 recipe sets it (configs/train/tos_llm_lora.yaml)."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def maybe_lora(model, args):
    if not args.lora:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(args))


def step_clock():
    """A Trainer callback: seconds to the end of the first optimizer step, then each step's seconds."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.first, self.times, self.t = None, [], None

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, a, state, control, **kw):
            if self.first is None:
                self.first = time.time() - T0
            else:
                self.times.append(time.time() - self.t)

    return StepClock()


def counting(collate, tokens: dict):
    """Wrap a collator to count real tokens: the attention mask's ones, or every id when padding-free."""
    def wrapped(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        n = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        tokens["n"] += n
        tokens.setdefault("steps", []).append(n)  # one batch per optimizer step (no accumulation)
        tokens["padded"] += mask.numel() if mask is not None else batch["input_ids"].numel()
        return batch

    return wrapped


def _lm_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # the usual hand-written fix: pad with EOS (masked out anyway)
        tok.pad_token = tok.eos_token
    return tok


def hand_loop(model, loader, args, loss_of) -> dict:
    """The loop a person writes: AdamW (fused), forward, backward, clip, step; batches are
    (input_ids, attention_mask, target) and loss_of(*batch) is the loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    model.train()
    first, times, tokens, padded, step, step_tokens = None, [], 0, 0, 0, []
    while step < args.steps:
        for ids, mask, target in loader:
            t = time.time()
            loss_of(ids, mask, target).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens, padded = tokens + int(mask.sum()), padded + mask.numel()
            step_tokens.append(int(mask.sum()))
            if first is None:
                first = time.time() - T0
            else:
                times.append(time.time() - t)
            if step == args.steps:
                break
    return {"first_step_s": first, "step_times": times, "nonpad_tokens": tokens, "step_tokens": step_tokens,
            "padded_fraction": 1 - tokens / padded}


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
    return hand_loop(model, loader, args,
                     lambda ids, mask, y: torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y))


def _training_args(cls, args, **extra):
    return cls(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
               weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear", logging_steps=args.steps,
               save_strategy="no", report_to=[], seed=args.seed, use_cpu=True, disable_tqdm=True, **extra)


def trainer(args) -> dict:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    texts, labels = read_clauses(args.data)
    enc = tok(texts, truncation=True, max_length=args.max_length)
    rows = [{"input_ids": ids, "attention_mask": m, "labels": y}
            for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    tokens, clock = {"n": 0, "padded": 0}, step_clock()
    collate = counting(DataCollatorWithPadding(tok), tokens)
    targs = _training_args(TrainingArguments, args,
                           train_sampling_strategy="group_by_length" if args.grouped else "random")
    Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[clock]).train()
    return {"first_step_s": clock.first, "step_times": clock.times, "nonpad_tokens": tokens["n"],
            "step_tokens": tokens["steps"][: args.steps],
            "padded_fraction": 1 - tokens["n"] / max(tokens["padded"], 1)}


def raw_sft(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    tok = _lm_tokenizer(args.model)
    model = maybe_lora(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args)
    rows = sft_rows(tok, args.data, args.max_length)

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return ids, mask, labels

    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)
    return hand_loop(model, loader, args, lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def trainer_sft(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = _lm_tokenizer(args.model)
    model = maybe_lora(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args)
    rows = sft_rows(tok, args.data, args.max_length)
    for r in rows:
        r["attention_mask"] = [1] * len(r["input_ids"])
    tokens, clock = {"n": 0, "padded": 0}, step_clock()
    collate = counting(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), tokens)
    targs = _training_args(TrainingArguments, args, train_sampling_strategy="group_by_length" if args.grouped else "random")
    Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[clock]).train()
    return {"first_step_s": clock.first, "step_times": clock.times, "nonpad_tokens": tokens["n"],
            "step_tokens": tokens["steps"][: args.steps],
            "padded_fraction": 1 - tokens["n"] / max(tokens["padded"], 1)}


def trl_sft(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = _lm_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = read_rows(args.data)
    if rows and isinstance(rows[0].get("prompt"), list):  # conversational: TRL applies the chat template itself
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    else:
        data = Dataset.from_list([{"prompt": p, "completion": r} for p, r in read_instructions(rows)])
    tokens, clock = {"n": 0, "padded": 0}, step_clock()
    # SFTConfig defaults to bf16 and activation checkpointing; the contenders all run fp32
    # without recomputation (bf16 autocast on a CPU without bf16 units is ~10x slower).
    config = _training_args(SFTConfig, args, max_length=args.max_length, packing=args.packing,
                            completion_only_loss=True, bf16=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[clock],
                         peft_config=lora_config(args) if args.lora else None)
    trainer.data_collator = counting(trainer.data_collator, tokens)
    trainer.train()
    return {"first_step_s": clock.first, "step_times": clock.times, "nonpad_tokens": tokens["n"],
            "step_tokens": tokens["steps"][: args.steps],
            "padded_fraction": 1 - tokens["n"] / max(tokens["padded"], 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["raw", "trainer", "raw_sft", "trainer_sft", "trl"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--grouped", action="store_true")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--lora", action="store_true", help="LoRA r 16 on every linear layer (the SmolLM2 recipe's)")
    p.add_argument("--out", default="bench-trainer-out")
    args = p.parse_args()
    result = {"raw": raw, "trainer": trainer, "raw_sft": raw_sft, "trainer_sft": trainer_sft, "trl": trl_sft}[args.kind](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
