"""Training-step time of the launcher's lean loss against the model's own loss, on the same
batches: SmolLM2-135M-Instruct with the SmolLM2 recipe's LoRA (r 16, every linear layer),
forward and backward only (no optimizer), in one process.

    python benchmarks/lean_loss_speed.py                 # LoRA dropout 0.05, as the recipe
    python benchmarks/lean_loss_speed.py --dropout 0     # without LoRA dropout
    python benchmarks/lean_loss_speed.py --full          # full fine-tuning: the head's weight trains too

Batches: the first --batches x 8 rows of the shared UNFAIR-ToS training clauses, in the
recipe's prompt, rendered by SmolLM2's chat template, padded to each batch's longest row;
labels on the last 4 tokens of each row (the answer and its end-of-turn). The first batch of
each pass is a warm-up; the rest are timed. Two passes of each loss, interleaved. Prints
seconds per pass and, last, one JSON object.

A third contender, `recompute`, is the lean loss as the launcher computed it before its head
made its gradients in the forward pass: the head applied to the decoder's hidden states
outside the model's forward, in chunks under activation checkpointing (each chunk's logits
computed again in the backward pass). Kept here to show what the change is worth.

The contenders above draw LoRA's dropout masks with torch's own `nn.Dropout`. A fourth,
`lean_cpu_masks`, is the lean loss with the masks every model the launcher builds draws on CPU
(launcher/tasks/dropout.py): the launcher's training step as it runs. Not with --full or
--dropout 0 (no dropout to draw).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "unfair_tos"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--full", action="store_true", help="full fine-tuning (no LoRA): the tied head's weight gets a gradient")
    p.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from throughput import smollm2  # this directory: the same conversion the throughput benchmark loads

    from launcher.tasks import dropout, lean_loss

    model_dir = smollm2(Path(tempfile.mkdtemp(prefix="lean-speed-")))
    recipe = yaml.safe_load((ROOT / "configs/train/tos_llm_lora.yaml").read_text())["data"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [json.loads(x) for x in (SHARED / "train.jsonl").read_text().splitlines() if x.strip()][: 8 * args.batches]
    texts = [tok.apply_chat_template([{"role": "system", "content": recipe["system_prompt"]},
                                      {"role": "user", "content": recipe["prompt"].format(**r)},
                                      {"role": "assistant", "content": recipe["response"].format(**r)}], tokenize=False)
             for r in rows]
    batches = []
    for k in range(args.batches):
        enc = tok(texts[8 * k : 8 * k + 8], return_tensors="pt", padding=True, padding_side="left")
        labels = enc["input_ids"].clone()
        labels[:, :-4] = -100
        batches.append({**enc, "labels": labels})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not args.full:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    losses = {"own": lambda b: model(**b).loss * float((b["labels"][:, 1:] != -100).sum()),
              "lean": lambda b: lean_loss.loss_sum(model, b, args.chunk),
              "recompute": lambda b: recompute_loss(model, b, args.chunk)}
    drops = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    if drops:
        losses["lean_cpu_masks"] = losses["lean"]
    print(f"batches: {[tuple(b['input_ids'].shape) for b in batches]}, "
          f"{'full fine-tuning' if args.full else f'LoRA dropout {args.dropout}'}, "
          f"{torch.get_num_threads()} threads", flush=True)
    timed: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(2):
        for name, fn in losses.items():
            for m in drops:
                m.__class__ = dropout.CpuDropout if name == "lean_cpu_masks" else torch.nn.Dropout
            seconds = []
            for b in batches:
                t = time.perf_counter()
                fn(b).backward()
                seconds.append(time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
            timed[name].append(sum(seconds[1:]))
            print(f"{name:<14} {sum(seconds[1:]):7.2f} s  (per batch: {', '.join(f'{s:.2f}' for s in seconds)})", flush=True)
    best = {name: min(v) for name, v in timed.items()}
    print(json.dumps({"full": args.full, "dropout": None if args.full else args.dropout, "seconds": timed, "speedup_lean_vs_own": round(best["own"] / best["lean"], 3),
                      "speedup_lean_vs_recompute": round(best["recompute"] / best["lean"], 3),
                      "speedup_cpu_masks": round(best["lean"] / best["lean_cpu_masks"], 3) if drops else None}))
    return 0


def recompute_loss(model, batch: dict, chunk: int):
    """The earlier lean loss: hidden states caught from the decoder, the head applied outside the
    model's forward to the labelled positions, each chunk checkpointed (recomputed in backward)."""
    import torch

    from launcher.tasks import lean_loss

    head = model.get_output_embeddings()
    _, hidden = lean_loss.forward_hidden(model, **{k: v for k, v in batch.items() if k != "labels"})
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    where = targets != -100
    hidden, targets = hidden[where], targets[where]

    def chunk_loss(h, t):
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

    return sum(torch.utils.checkpoint.checkpoint(chunk_loss, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
               for s in range(0, targets.shape[0], chunk))


if __name__ == "__main__":
    sys.exit(main())
