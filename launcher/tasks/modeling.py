"""What both tasks do to a model after building it: the attention kernel, activation
checkpointing, no KV cache while training, LoRA, dropout masks drawn fast on CPU. One place,
so the tasks cannot drift."""

from __future__ import annotations

import importlib.util
import typing

from launcher.errors import ConfigError

if typing.TYPE_CHECKING:
    from launcher.config import TaskConfig


def attn_implementation(model_cfg, precision: str, model_class=None) -> str:
    """The attention kernel. auto: flash attention 2 for a bf16/fp16 run on CUDA with the
    flash-attn package installed, sdpa otherwise (the kernels run in 16 bits only, so an fp32
    run would crash at its first forward), and eager for a model class without either (DeBERTa
    has no sdpa: asking for it failed the load). An explicit flash_attention_2 this host cannot
    run is one line (ConfigError); in fp32, wrong on any machine, the launch's check refused it
    already (engines.model_problems), as `launcher plan` does.
    model_class: the class the run builds, where known (models.model_class)."""
    import torch

    choice = model_cfg.attn_implementation
    sixteen = precision in ("bf16", "fp16")
    available = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        if sixteen and available and getattr(model_class, "_supports_flash_attn", True):
            return "flash_attention_2"
        return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
    if choice == "flash_attention_2" and not available:  # (in fp32 it was refused with the launch: engines.model_problems)
        raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; "
                          "use auto or sdpa")
    return choice


def attn_for(cfg: "TaskConfig", auto) -> str:
    """attn_implementation for the class `auto` (an Auto class) builds from model.name; a
    tiny model's classes have every kernel."""
    from transformers import AutoConfig

    from launcher import models
    from launcher.config import TINY_MODEL

    built = None
    if cfg.model.name != TINY_MODEL:
        built = models.model_class(auto, models.from_pretrained(AutoConfig, cfg.model.name, cfg.model))
    return attn_implementation(cfg.model, cfg.precision, built)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def finish(model, cfg: "TaskConfig", task: str, dtype: str = "float32"):
    """Dtype, checkpointing, cache and LoRA on a freshly built model (in that order: peft
    wraps the model whose layers already recompute). Whatever trains is float32 unless the
    dtype policy chose bf16 weights for an engine that keeps fp32 masters."""
    import torch

    from launcher import quantization

    if quantization.is_quantized(model):
        from peft import prepare_model_for_kbit_training

        # Freezes the base and keeps its unquantized parameters (norms, embeddings) in fp32;
        # checkpointing is enabled below, as for any model.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        quantization.keep_one_layout(model)
    elif model.dtype != torch_dtype(dtype):
        model = model.to(torch_dtype(dtype))
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # training never reuses keys/values; generation asks for them itself
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA), ZeRO-3's parameter hooks and
        # keyword arguments; recomputation replays the RNG, so dropout masks are the same.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        from launcher.tasks import lora

        # transformers (gradient_checkpointing_enable, above) and peft (get_peft_model) each make
        # the embeddings' output require a gradient, which reentrant checkpointing needs. The
        # non-reentrant kind needs none, and with one the backward pass would run through every
        # block, also those below model.lora.layers_to_transform: both hooks go.
        if cfg.gradient_checkpointing:
            model.disable_input_require_grads()
        model = lora.apply(model, cfg.model.lora, task)
        if cfg.gradient_checkpointing:
            model.disable_input_require_grads()
        for p in model.parameters():  # adapters and trained heads keep fp32 over a bf16 base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    from launcher.tasks import dropout

    dropout.fast_cpu_masks(model)  # after LoRA: its dropouts too
    return model
