"""Causal-LM loss without the sequence x vocabulary logits.

The model's own loss computes logits for every position and upcasts them to float32;
cross-entropy then keeps float32 log-probabilities of the same size for the backward pass.
With a 152k vocabulary that is about 2.5 GB per 1k tokens. Here the model runs its own
(wrapped: DDP, DeepSpeed, FSDP2, peft) forward, and its output head module, when the model
calls it, returns the sum of the token losses instead of logits (`HeadLoss`): only positions
that have a label go through the head, a chunk at a time, and each chunk's gradients (for the
hidden states and the head's weight) are computed in the forward pass, as fused
linear-cross-entropy kernels do. So no chunk's logits outlive it, nothing is recomputed in the
backward pass, and the weight is only read inside the head module's own forward: the one place
ZeRO-3 and FSDP2 hold it whole. The result is the same sum of token losses (tested against the
model's own loss, values and gradients, on one process and under ZeRO-3 and FSDP2).

`self_check` compares the two once, on a validation row, before the run uses it: a model that
does more to its logits than its head (logit scaling: Granite's logits_scaling, Falcon-H1's
lm_head_multiplier, remote-code muP models) or whose head is not a plain linear layer falls
back to its own loss, with one line. No list of such models is kept: the comparison finds them.

Evaluation takes a lighter path without gradients (`Head`, where the head's weight is whole on
this rank): the model's forward keeps one position of logits, and the head runs on the
positions that are scored, a chunk at a time, so no batch x length x vocabulary tensor exists
(with a 152k vocabulary, 8 x 2k tokens of fp32 logits are 9.3 GiB).
"""

from __future__ import annotations

import contextlib

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


def _head(model):
    causal = _unwrap(model)
    return causal.get_output_embeddings() if getattr(causal, "config", None) is not None else None


def head_problem(model) -> str | None:
    """Why the output head cannot compute the loss itself: it must be a plain linear layer
    (FSDP2's and DeepSpeed's hooks leave its forward alone; a peft-wrapped or quantized head
    computes something else)."""
    head = _head(model)
    if head is None:
        return f"{type(_unwrap(model)).__name__} has no output head"
    if type(head).forward is not torch.nn.Linear.forward:
        return f"its output head is {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear"
    return None


def supported(model) -> bool:
    """The chunked loss can run on this model (self_check then compares it with the model's own)."""
    return head_problem(model) is None


def whole_head(model) -> bool:
    """Evaluation's `Head` can run: the head's weight is whole on this rank (not a ZeRO-3 or
    FSDP2 shard: `Head` reads it outside the module's forward), and the model has a decoder
    (`base_model`) whose hidden states forward_hidden can catch, and keeps fewer logits."""
    import inspect

    causal, head = _unwrap(model), _head(model)
    params = inspect.signature(causal.forward).parameters.values()
    keeps = any(p.name == "logits_to_keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return (supported(model) and keeps and getattr(causal, "base_model", causal) is not causal
            and not any(engines.is_partitioned(p) for p in head.parameters()))


def self_check(model, batch: dict, chunk: int, evaluation: bool = False) -> str | None:
    """None when the chunked loss (`loss_sum`; with `evaluation`, the lean evaluation head's,
    `eval_loss_sum`) equals the model's own loss on `batch` (SELF_CHECK_RTOL, relative); else
    why it cannot stand in for it. Runs in eval mode (no dropout) without gradients and leaves
    the RNG as it found it (a resumed run draws the same masks). Under ZeRO-3 and FSDP2 both
    forwards are collectives: every rank must check the same row."""
    causal = _unwrap(model)
    lean_sum = eval_loss_sum if evaluation else loss_sum
    if (why := head_problem(model)) is not None:
        return why
    devices = [batch["input_ids"].device] if batch["input_ids"].device.type == "cuda" else []
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            one = torch.tensor(1.0, device=batch["input_ids"].device)
            own = float(model(**batch, num_items_in_batch=one).loss)
            lean = float(lean_sum(model, batch, chunk))
    except Exception as e:  # noqa: BLE001 - any failure on this model means: use its own loss
        return f"it fails on this model ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
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


def targets_of(labels: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the next position's label (IGNORE after the last)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


def _capped(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the final logit softcap applied to float32 `logits`, tanh(logits / softcap) for its
    gradient); `logits` and None without a cap."""
    if not softcap:
        return logits, None
    squashed = torch.tanh(logits / softcap)
    return squashed * softcap, squashed


def _logits(hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    return _capped(head(hidden).float(), softcap)[0]


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


def eval_loss_sum(model, batch: dict, chunk: int) -> torch.Tensor:
    """The batch's response-token loss sum as evaluation's `Head` computes it: the decoder's
    hidden states caught by forward_hidden, the head applied outside the model's forward.
    A model that changes them between its decoder and its head differs here."""
    _, hidden = forward_hidden(model, **{k: v for k, v in batch.items() if k != "labels"})
    return Head(model, chunk).token_losses(hidden, targets_of(batch["labels"])).sum()


def eval_head(model, chunk: int, check: dict | None) -> tuple[Head | None, str | None]:
    """(the lean evaluation head, or None: the model's own logits; why not, when the
    self-check on `check` refused it). Used where the head's weight is whole (`whole_head`)."""
    if not chunk or not whole_head(model):
        return None, None
    why = self_check(model, check, chunk, evaluation=True) if check is not None else NO_CHECK_ROW
    return (None, why) if why else (Head(model, chunk), None)


class HeadLoss(torch.autograd.Function):
    """Sum over rows of cross-entropy(softcap(hidden @ weight.T + bias), targets), `chunk` rows at
    a time. The gradients for hidden, weight and bias are computed chunk by chunk in the forward
    pass and only scaled in the backward pass, so the backward needs neither the logits nor the
    weight (which ZeRO-3 and FSDP2 hold whole only while the head module runs). The matmuls run
    under the caller's autocast, as the head's own would; the softmax and the weight's gradient
    sum are float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, softcap: float | None, grads: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if grads and hidden.requires_grad else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if grads and weight.requires_grad else None)
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if grads and bias is not None and bias.requires_grad else None)
        for start in range(0, targets.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            raw = torch.nn.functional.linear(h, weight, bias)
            logits, squashed = _capped(raw.float(), softcap)
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # d loss / d logits = softmax - one-hot
            g[torch.arange(t.shape[0], device=g.device), t] -= 1.0
            if squashed is not None:
                g.mul_(1.0 - squashed * squashed)
            g = g.to(raw.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ weight
            if grad_w is not None:  # in place: no float32 copy of a vocabulary x hidden product
                if g.dtype == h.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w.add_(g.t() @ h)
            if grad_b is not None:
                grad_b += g.float().sum(0)
        # Kept in float32 until backward scales them (a loss scale, 1 / accumulation): rounding
        # to fp16 before that could overflow a sum the scale would have kept in range.
        ctx.grads = grad_h, grad_w, grad_b
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out.float()
        scaled = [None if g is None else (g * scale).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*scaled, None, None, None, None)


@contextlib.contextmanager
def head_computes_loss(model, targets: torch.Tensor, chunk: int):
    """While inside, the model's output head, when its forward calls it on the hidden states of
    every position (batch x length x hidden), returns the sum of the token losses against
    `targets` (batch x length; IGNORE where unscored) instead of logits. Its forward is replaced
    on the instance, so the engines' hooks around the module (ZeRO-3's gather, FSDP2's unshard,
    and the gradient reductions after backward) run as for any forward of it. A final logit
    softcap moves from the model's forward into the loss, where it applies to the logits.

    Yields the list of what the head was called on. A call it does not expect (other shapes,
    more arguments) gets plain logits, so the forward, and the engines' hooks, complete as
    usual; loss_sum then refuses the result."""
    causal, head = _unwrap(model), _head(model)
    cfg = causal.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    grads = torch.is_grad_enabled()
    calls: list[str] = []

    def forward(hidden, *args, **kwargs):
        expected = not args and not kwargs and tuple(hidden.shape[:-1]) == tuple(targets.shape)
        calls.append("" if expected else f"{tuple(hidden.shape)} for {tuple(targets.shape)} targets")
        if not expected:
            return torch.nn.functional.linear(hidden, head.weight, head.bias)
        where = targets != IGNORE
        return HeadLoss.apply(hidden[where], head.weight, head.bias, targets[where], chunk, softcap, grads)

    before = head.__dict__.get("forward")  # an instance forward of its own (a dispatch hook), kept
    head.forward = forward
    if softcap:
        cfg.final_logit_softcapping = None
    try:
        yield calls
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before
        if softcap:
            cfg.final_logit_softcapping = softcap


def loss_sum(model, batch: dict, chunk: int) -> torch.Tensor:
    """Sum of cross-entropy over the batch's response tokens (labels shift by one), computed by
    the output head inside the model's forward (head_computes_loss)."""
    targets = targets_of(batch["labels"])
    with head_computes_loss(model, targets, chunk) as calls:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})  # every position reaches the head
    if calls != [""] or out.logits.dim() != 0:
        what = "; ".join(c or "the expected shape" for c in calls) or "never"
        raise ValueError(f"the output head was called on {what} (once, on every position, expected)")
    return out.logits
