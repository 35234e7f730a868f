"""What both tasks do to a model after building it: the attention kernel, activation
checkpointing, no KV cache while training, LoRA. One place, so the tasks cannot drift."""

from __future__ import annotations

import importlib.util

from launcher.errors import ConfigError


def attn_implementation(model_cfg) -> str:
    """auto: flash attention 2 on CUDA when the package is installed, sdpa otherwise."""
    import torch

    choice = model_cfg.attn_implementation
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    if choice == "flash_attention_2" and not (cuda and importlib.util.find_spec("flash_attn")):
        raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; "
                          "use auto or sdpa")
    return choice


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def finish(model, cfg, task: str, dtype: str = "float32"):
    """Dtype, checkpointing, cache and LoRA on a freshly built model (in that order: peft
    wraps the model whose layers already recompute). Whatever trains is float32 unless the
    dtype policy chose bf16 weights for an engine that keeps fp32 masters."""
    import torch

    if model.dtype != torch_dtype(dtype):
        model = model.to(torch_dtype(dtype))
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # training never reuses keys/values; generation asks for them itself
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA), ZeRO-3's parameter hooks and
        # keyword arguments; recomputation replays the RNG, so dropout masks are the same.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        from launcher.tasks import lora

        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
        model = lora.apply(model, cfg.model.lora, task)
        for p in model.parameters():  # adapters and trained heads keep fp32 over a bf16 base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return model
