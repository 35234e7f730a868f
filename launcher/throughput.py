"""Live throughput: model FLOPs per token, the device's peak, and so MFU.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6N for the weights
(2N forward, 4N backward: gradients of activations and of weights) plus 12·L·h·s for
attention scores and their use (L layers, hidden h, s tokens of context: the training
tokens' mean context, sum(s_i^2) / sum(s_i) over the examples, not max_length). N counts the
weights a token is multiplied by (matmul_params): embedding tables are lookups, and in a
small encoder they are half the model (all-MiniLM-L6-v2: 52%), so counting them doubled MFU. With frozen base
weights (LoRA) the backward pass computes no weight gradients for them: about 4N, the
attention term scaled alike. MFU = achieved FLOP/s / peak FLOP/s; it counts no
recomputation (activation checkpointing does ~1/3 more work and shows as lower MFU).
"""

from __future__ import annotations

# Dense bf16 (and TF32, for fp32 runs) tensor-core peaks per GPU, from NVIDIA's data sheets.
PEAK_TFLOPS = {  # name fragment -> (bf16, tf32)
    "H200": (989.0, 494.7),
    "H100": (989.0, 494.7),  # SXM; PCIe parts are slower: set train.peak_tflops
    "A100": (312.0, 156.0),
}


def flops_per_token(n_matmul: int, n_trainable: int, n_layers: int, hidden: int, seq_len: float,
                    n_params: int | None = None) -> float:
    """n_matmul: matmul_params; n_params: all parameters (n_matmul when not given), against
    which n_trainable tells a frozen base."""
    frozen = n_trainable < 0.5 * (n_params or n_matmul)  # LoRA-like: weight gradients only for a small part
    weights = (4.0 if frozen else 6.0) * n_matmul
    attention = 12.0 * n_layers * hidden * seq_len * (4.0 / 6.0 if frozen else 1.0)
    return weights + attention


def matmul_params(model, numel) -> int:
    """N for the 6N term: every parameter but the embedding tables (word, position, token
    type: lookups, no matmul), plus a causal LM's output head when it is tied to the word
    table, since every token is multiplied by it (an untied head is a Linear, counted already).
    numel: a parameter's whole size, sharded or not (engines.full_numel)."""
    import torch

    params = {id(p): p for p in model.parameters()}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    tied = {id(weight)} & tables if isinstance(weight, torch.nn.Parameter) else set()
    return sum(numel(p) for i, p in params.items() if i not in tables or i in tied)


def peak_flops(device_name: str, precision: str, override_tflops: float | None) -> float | None:
    """FLOP/s the device can do at this precision; None when unknown (then no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    for fragment, (bf16, tf32) in PEAK_TFLOPS.items():
        if fragment in device_name:
            return (bf16 if precision in ("bf16", "fp16") else tf32) * 1e12
    return None


def model_shape(config) -> tuple[int, int]:
    """(layers, hidden size) of a transformers config, 0s when it names neither."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    return int(layers), int(hidden)
