"""A quantized frozen base (QLoRA): how it is loaded, and how it becomes a plain model again.

`model.quantization: nf4` loads every linear layer of the base (not the output head) as
bitsandbytes' 4-bit NF4 with double quantization, the QLoRA recipe (Dettmers et al., 2023);
`int8` as LLM.int8() layers. The adapters train in fp32 on top. At export the base is
dequantized and the adapters are merged into it: a plain model any transformers loads.
peft's own merge re-quantizes the merged weight, which would round the adapters' small
updates away, so the dequantization is done here.
"""

from __future__ import annotations

import copy

import torch


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for model.quantization (nf4 or int8)."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_device() -> torch.device:
    """Where a quantized base is built: bitsandbytes quantizes as the weights land on their
    device, and a quantized model cannot be moved afterwards."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_quantized(model) -> bool:
    import sys

    if "bitsandbytes" not in sys.modules:  # a quantized model imported it; no import per module here
        return False
    return any(_kind(m) for m in model.modules())


def keep_one_layout(model) -> None:
    """Every 4-bit layer keeps the layout it trains in, through evaluation too.

    On a CPU with AVX512-BF16 (Sapphire Rapids, Zen 4 and later), bitsandbytes 0.50 rewrites a
    4-bit weight in place the first time the layer runs in eval mode without gradients: a
    packed layout with bf16 scales, for its inference kernel. Measured here on a 2-layer Llama
    after one evaluation: the logits move by 2e-3 (bf16 scales), the weight read back for the
    export is off by 0.1 (the dequantization does not know the packed layout), training after
    it backpropagates through a kernel with no autograd formula, and a layer narrower than
    the 64-value block fails outright. So the rewrite is switched off on every such layer."""
    for module in model.modules():
        if _kind(module) == "nf4" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _kind(module) -> str | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "nf4"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def dequantized_weight(module) -> torch.Tensor:
    """A bitsandbytes linear layer's weight as float32 (what its forward multiplies by)."""
    import bitsandbytes.functional as F

    w = module.weight
    if _kind(module) == "nf4":
        return F.dequantize_4bit(w.data, w.quant_state).float()
    # int8: each row's int8 values times its absmax / 127. The scales sit on the weight or, once
    # the layer has run or been loaded (bitsandbytes 0.50), on the layer's state.
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError(f"{type(module).__name__}: no int8 scales (SCB) to dequantize with")
    cb = w.CB if getattr(w, "CB", None) is not None else w.data
    return cb.float() * scb.float()[:, None] / 127.0


def dequantized_state_dict(model) -> dict:
    """The model's state dict on the CPU, every quantized weight replaced by its float32 value
    and bitsandbytes' quantization state entries left out (names as the unquantized model has
    them). Each weight is dequantized on its device and moved off it at once: the whole model
    in fp32 is 8x its NF4 size and would not fit beside it on the GPU."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if _kind(module) is None:
            continue
        key = f"{name}.weight"
        for k in [k for k in state if k.startswith(key + ".") or k in (f"{name}.SCB", f"{name}.weight_format")]:
            del state[k]
        state[key] = dequantized_weight(module).cpu()
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def plain_config(config):
    """A copy of a quantized model's config that loads as a plain model."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_dequantized(auto, name: str, kind: str, dtype: str, config, **kwargs):
    """`launcher export` of a QLoRA checkpoint: the base quantized as the run quantized it (the
    same source, kind and dtype give the same packed weights), then as a plain model whose
    weights are those values: the base the adapters trained on."""
    from launcher import models

    compute = getattr(torch, dtype)
    quantized = models.from_pretrained(auto, name, config=config, quantization_config=bnb_config(kind, compute),
                                       device_map={"": load_device()}, dtype=compute, **kwargs)
    with torch.device("meta"):  # no random init of a whole fp32 model: the tensors are assigned
        plain = models.from_config(auto, plain_config(quantized.config))
    missing, unexpected = plain.load_state_dict(dequantized_state_dict(quantized), strict=False, assign=True)
    missing += [n for n, p in plain.named_parameters() if p.is_meta and n not in missing]
    if missing or unexpected:
        raise RuntimeError(f"{name}: the dequantized base does not fit its model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return plain
