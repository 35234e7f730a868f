"""Peak memory of one causal-LM evaluation batch: the model's own logits vs the lean head.

A random Llama with SmolLM2-135M's widths and vocabulary (hidden 576, 9 heads, 3 KV heads,
MLP 1536, 49,152 tokens; `--layers` of them, 4 by default: the logits' size does not depend
on depth) scores a batch of rows of `--tokens` tokens whose answers fill all but a short
prompt, as `launcher train`'s evaluation does (tasks/generation.run_batch). Each mode runs in
a fresh process on the CPU in fp32 and reports its peak RSS above the RSS after the model
and batch were built, and the batch's loss sum, which must agree between the modes:

- `model`: the model's forward keeps logits from the last prompt position on (B x answer
  length x vocabulary, fp32), the cross-entropy is then taken in chunks;
- `lean`: the forward keeps one position; the head scores the hidden states 256 positions
  at a time (tasks/lean_loss.Head), so no B x L x V tensor exists.

The last line is a JSON object with both modes and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(mode: str, rows: int, tokens: int, layers: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from launcher.tasks import generation, lean_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=tokens, tie_word_embeddings=True,
                         use_cache=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    prompt = 32
    batch_rows = []
    for r in range(rows):
        ids = torch.randint(1, config.vocab_size, (tokens,)).tolist()
        batch_rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "answer": "", "question": ""})
    batch = generation.collate(batch_rows, list(range(rows)), 0, generate=False)
    assert lean_loss.supported(model)
    head = lean_loss.Head(model, 256) if mode == "lean" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = generation.run_batch(model, batch, None, set(), 0, head=head)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "peak_over_base_mib": round((peak - base) / 1024, 1), "base_mib": round(base / 1024, 1),
            "loss_sum": sum(r["loss"] for r in results), "tokens": sum(r["tokens"] for r in results)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--one", choices=["model", "lean"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.rows, a.tokens, a.layers)))
        return 0
    out = {"rows": a.rows, "tokens": a.tokens, "vocab": 49152, "layers": a.layers}
    for mode in ("model", "lean"):
        proc = subprocess.run([sys.executable, __file__, "--one", mode, "--rows", str(a.rows), "--tokens", str(a.tokens),
                               "--layers", str(a.layers)], cwd=ROOT, capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: peak RSS +{out[mode]['peak_over_base_mib']} MiB over {out[mode]['base_mib']} MiB; "
              f"loss sum {out[mode]['loss_sum']:.4f} over {out[mode]['tokens']} tokens", flush=True)
    out["ratio_model_over_lean"] = round(out["model"]["peak_over_base_mib"] / max(out["lean"]["peak_over_base_mib"], 1e-9), 2)
    out["loss_rel_diff"] = abs(out["model"]["loss_sum"] - out["lean"]["loss_sum"]) / abs(out["model"]["loss_sum"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
