"""Causal-LM loss without the sequence x vocabulary logits.

The model's own loss computes logits for every position and upcasts them to float32;
cross-entropy then keeps float32 log-probabilities of the same size for the backward pass.
With a 152k vocabulary that is about 2.5 GB per 1k tokens. Here the model runs through its
(wrapped: DDP, DeepSpeed, peft) forward with `logits_to_keep=1`, the final hidden states are
taken from its decoder, and the head is applied only to positions that have a label, in
chunks under activation checkpointing: each chunk's logits exist only while that chunk's
loss is computed, in the forward pass and again in the backward pass. The result is the same
sum of token losses (tested against the model's own loss, values and gradients).

ZeRO-3 and FSDP2 (see `supported`) keep the model's own loss. Elsewhere `self_check` compares
the two once, on a validation row, before the run uses it: a model that does more to its
logits than its head (logit scaling: Granite's logits_scaling, Falcon-H1's
lm_head_multiplier, remote-code muP models) or that cannot keep fewer logits falls back to
its own loss, with one line. No list of such models is kept: the comparison finds them.

Evaluation takes the same path without gradients (`Head`): the model's forward keeps one
position of logits, and the head runs on the positions that are scored, a chunk at a time,
so no batch x length x vocabulary tensor exists (with a 152k vocabulary, 8 x 2k tokens of
fp32 logits are 9.3 GiB).
"""

from __future__ import annotations

import torch

from launcher import engines

IGNORE = -100
# Relative: fp32 paths agree to ~1e-7; under bf16 autocast the chunked head's matmuls have
# other shapes than the full one and round differently per token, which averages out in the
# sum; any logit scale moves the loss by far more.
SELF_CHECK_RTOL = 1e-3
SELF_CHECK_TOKENS = 512  # the compared row is cut to this: its full logits are built once


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, DeepSpeed's engine
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def supported(model) -> bool:
    """Not under ZeRO-3 or FSDP2: recomputing the head in the backward pass meets a partitioned
    weight there when the head is frozen (LoRA), and checkpointing refuses the changed
    tensor (seen on 2 CPU ranks); those runs keep the model's own loss."""
    causal = _unwrap(model)
    cfg = getattr(causal, "config", None)
    head = causal.get_output_embeddings() if cfg is not None else None
    # FSDP2 shards the head into DTensors and runs it as its own unit; calling it once per
    # chunk, again in the backward pass, crashes its hooks (SIGSEGV in backward, 2 CPU ranks).
    partitioned = head is not None and any(engines.is_partitioned(p) for p in head.parameters())
    return head is not None and hasattr(causal, "base_model") and causal.base_model is not causal and not partitioned


def self_check(model, batch: dict, chunk: int) -> str | None:
    """None when the chunked loss equals the model's own loss on `batch` (SELF_CHECK_RTOL,
    relative); else why it cannot stand in for it. Runs in eval mode (no dropout) without
    gradients and leaves the RNG as it found it (a resumed run draws the same masks)."""
    import inspect

    causal = _unwrap(model)
    params = inspect.signature(causal.forward).parameters.values()
    if not any(p.name == "logits_to_keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return f"{type(causal).__name__}.forward takes no logits_to_keep"
    devices = [batch["input_ids"].device] if batch["input_ids"].device.type == "cuda" else []
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            one = torch.tensor(1.0, device=batch["input_ids"].device)
            own = float(model(**batch, num_items_in_batch=one).loss)
            lean = float(loss_sum(model, batch, chunk))
    except (TypeError, ValueError, RuntimeError) as e:
        return f"it fails on this model ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    finally:
        model.train(was)
    rel = abs(lean - own) / max(abs(own), 1e-12)
    if rel > SELF_CHECK_RTOL:
        return (f"it differs from {type(causal).__name__}'s own loss by {rel:.1%} on a validation row "
                "(the model does more to its logits than its output head)")
    return None


NO_CHECK_ROW = "no validation row has a label to compare it on"


def check_batch(rows, device=None) -> dict | None:
    """The first of `rows` (input_ids, labels) with a predicted label, as a one-row training
    batch on `device`: at most SELF_CHECK_TOKENS tokens, the window starting up to half of
    that before its first label (a long prompt is cut from the left). None if none has one."""
    for r in rows:
        ids, labels = list(r["input_ids"]), list(r["labels"])
        first = next((i for i, y in enumerate(labels) if i > 0 and y != IGNORE), None)
        if first is None:
            continue
        start = max(0, first - SELF_CHECK_TOKENS // 2)
        ids, labels = ids[start : start + SELF_CHECK_TOKENS], labels[start : start + SELF_CHECK_TOKENS]
        t = torch.tensor([ids], device=device)
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": torch.tensor([labels], device=device)}
    return None


def _logits(hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, softcap: float | None,
                reduction: str = "sum") -> torch.Tensor:
    return torch.nn.functional.cross_entropy(_logits(hidden, head, softcap), labels, reduction=reduction)


def forward_hidden(model, **inputs):
    """(the model's output with one position of logits, the decoder's final hidden states)."""
    causal = _unwrap(model)
    captured = {}

    def keep(_module, _inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = causal.base_model.register_forward_hook(keep)
    try:
        out = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return out, captured["hidden"]


class Head:
    """The model's output head run outside its forward, for evaluation (no gradients): logits
    of a few positions, or per-token losses a chunk of positions at a time."""

    def __init__(self, model, chunk: int):
        causal = _unwrap(model)
        self.head, self.chunk = causal.get_output_embeddings(), chunk
        self.softcap = getattr(causal.config, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _logits(hidden, self.head, self.softcap)

    def token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each position's prediction of `targets` (float32; 0 where ignored)."""
        out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        where = targets != IGNORE
        h, t = hidden[where], targets[where]
        parts = [_chunk_loss(h[s : s + self.chunk], t[s : s + self.chunk], self.head, self.softcap, "none")
                 for s in range(0, t.shape[0], self.chunk)]
        if parts:
            out[where] = torch.cat(parts)
        return out


def eval_head(model, chunk: int, check: dict | None) -> tuple[Head | None, str | None]:
    """(the lean evaluation head, or None: the model's own logits; why not, when the
    self-check on `check` refused it). Used where the lean loss is `supported`."""
    if not chunk or not supported(model):
        return None, None
    why = self_check(model, check, chunk) if check is not None else NO_CHECK_ROW
    return (None, why) if why else (Head(model, chunk), None)


def loss_sum(model, batch: dict, chunk: int) -> torch.Tensor:
    """Sum of cross-entropy over the batch's response tokens (labels shift by one)."""
    causal = _unwrap(model)
    head = causal.get_output_embeddings()
    _, hidden = forward_hidden(model, **{k: v for k, v in batch.items() if k != "labels"})
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # position t predicts t+1
    where = targets != IGNORE
    hidden, targets = hidden[where], targets[where]
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    if targets.numel() == 0:  # keep the graph: every rank must run the same backward
        return hidden.sum().float() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss, hidden[start : start + chunk], targets[start : start + chunk], head, softcap, use_reentrant=False)
    return total
