"""How a classifier reads a text: model.pooling.

cls (the default): the architecture's own head. For BERT-family encoders that is a dense+tanh
pooler over the [CLS] token; a decoder LLM's head reads the text's last token.

mean: the mean of the last hidden states over the text's tokens (attention mask 1).
- Encoders: the pooling sentence encoders such as all-MiniLM-L6-v2 were trained with
  (sentence-transformers), a training that never used the [CLS] pooler. The base model's pooler
  is replaced by a parameterless module; the model's own dropout and classifier read its output.
- Decoder LLMs (a `score` head that reads the last real token, e.g. LlamaForSequenceClassification):
  a forward hook on the base model puts each text's masked mean at every position of its last
  hidden states, so the head's own choice of position reads the mean, whichever it picks. The
  head has no parameters to replace, and the export's weights are plain transformers ones.
In both, the model stays its transformers class, so engines, LoRA, checkpoints and the export
treat it as any classifier.

The model config carries the choice (`launcher_pooling: mean`, `record`), and the config is
the only carrier: `launcher.models.from_config` and `models.from_pretrained`, which build every
model launcher makes, apply what the config they build from records (`follow`). So the run,
`plan`, eval, predict, the LoRA merge and the offline export cannot disagree, and a new build
path cannot forget it. Plain transformers reads such an export its own way: an encoder gets a
new random pooler over [CLS] (it warns that `pooler.dense` is newly initialised), a decoder
reads the last token. Read it with launcher, or apply `use_mean_pooling` to the loaded model.

The attention mask reaches the pooling through a forward pre-hook on the base model, which
stores it for that one forward (the pooler's call in transformers passes the hidden states
only). The hooks are module-level functions that find what they need on the module they run
for, so a copied model pools with its own mask.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import ConfigError

CONFIG_KEY = "launcher_pooling"  # in the model config (config.json of the export)


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, hidden): the mean over each row's tokens whose mask is 1 (all when no mask)."""
    h = hidden_states.float()  # a sum over up to max_length tokens: not in bf16
    if mask is None:
        return h.mean(dim=1).to(hidden_states.dtype)
    m = mask[:, : h.shape[1]].to(h.dtype).unsqueeze(-1)
    return ((h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).to(hidden_states.dtype)


class MeanPooler(nn.Module):
    """Masked mean of the last hidden states, in place of a base model's [CLS] pooler."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask, self.mask = self.mask, None
        return masked_mean(hidden_states, mask)


def _mask_of(module: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The attention mask a base model's forward was called with, by keyword or by position
    (its place differs: BERT's second argument, GPT-2's third)."""
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
    return mask


def _keep_mask(module: Any, args: tuple, kwargs: dict) -> None:
    module.pooler.mask = _mask_of(module, args, kwargs)


def _keep_decoder_mask(module: Any, args: tuple, kwargs: dict) -> None:
    module.launcher_pooling_mask = _mask_of(module, args, kwargs)


def _mean_at_every_position(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """The decoder's last hidden states with each row's masked mean at every position: the
    head, a linear map of one position, then reads the mean wherever it reads."""
    mask, module.launcher_pooling_mask = getattr(module, "launcher_pooling_mask", None), None
    if isinstance(output, tuple):  # return_dict=False, which some heads pass on: hidden states first
        return (masked_mean(output[0], mask).unsqueeze(1).expand_as(output[0]), *output[1:])
    hidden = output.last_hidden_state
    output.last_hidden_state = masked_mean(hidden, mask).unsqueeze(1).expand_as(hidden)
    return output


def _decoder(model: Any) -> bool:
    """A decoder classifier whose linear `score` head reads one position of the base model's
    last hidden states (transformers' ...ForSequenceClassification for Llama, GPT-2 and kin)."""
    score = getattr(model, "score", None)
    score = getattr(score, "original_module", score)  # peft's ModulesToSaveWrapper around the head
    return isinstance(score, nn.Linear) and model.base_model is not model


# Classifiers whose base model has a pooler that their head never reads (BigBird's reads the
# first token's state itself): a mean pooler there would change nothing. Found by building
# every class of transformers' sequence-classification mapping (transformers 5).
POOLER_UNUSED = ("big_bird",)


def check(model: nn.Module, model_name: str) -> None:
    """One line (ConfigError) when the model has neither a [CLS] pooler that mean pooling can
    replace nor a decoder's one-position head."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind in POOLER_UNUSED:
        raise ConfigError(f"model.pooling: mean replaces the [CLS] pooler a classifier's head reads, and "
                          f"{model_name} ({kind}) has one its head does not read: use model.pooling=cls")
    if not isinstance(getattr(model.base_model, "pooler", None), nn.Module) and not _decoder(model):
        raise ConfigError(f"model.pooling: mean replaces a BERT-family encoder's [CLS] pooler or a decoder's "
                          f"last-token head, and {model_name} ({kind}) has neither: use model.pooling=cls")


def use_mean_pooling(model: Any, model_name: str = "the model") -> Any:
    """Pool by the masked mean (in place; returns the model). Once: a model that pools by the
    mean already is returned as it is. A peft model (an adapter loaded on its base) is pooled
    through the model it wraps."""
    # Asked of peft itself, not of launcher.tasks.lora (which builds models, and models pool:
    # an import cycle); a model is a peft model only once peft is imported, so a plain one
    # costs no import.
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        use_mean_pooling(model.get_base_model(), model_name)
        return model
    base: Any = model.base_model
    if isinstance(getattr(base, "pooler", None), MeanPooler) or hasattr(base, "launcher_pooling_mask"):
        return model
    check(model, model_name)
    if isinstance(getattr(base, "pooler", None), nn.Module):
        base.pooler = MeanPooler()
        base.register_forward_pre_hook(_keep_mask, with_kwargs=True)
    else:
        base.launcher_pooling_mask = None
        base.register_forward_pre_hook(_keep_decoder_mask, with_kwargs=True)
        base.register_forward_hook(_mean_at_every_position, with_kwargs=True)
    setattr(model.config, CONFIG_KEY, "mean")
    return model


def apply(model: Any, pooling: str | None, model_name: str = "the model") -> Any:
    """The pooling a config or an export names (None or cls: the model's own head)."""
    return use_mean_pooling(model, model_name) if pooling == "mean" else model


def saved(model_config) -> str:
    """The pooling a model config records (cls when it records none)."""
    return getattr(model_config, CONFIG_KEY, None) or "cls"


def record(model_config, pooling: str | None) -> None:
    """Write model.pooling into the config a model is then built from (mean only: a cls
    config stays as transformers writes it)."""
    if pooling == "mean":
        setattr(model_config, CONFIG_KEY, "mean")


def follow(model: Any, model_name: str = "the model") -> Any:
    """The pooling the model's own config records (models.from_config and from_pretrained)."""
    config = getattr(model, "config", None)
    # A classifier's only: a classifier export loaded as a causal LM reads tokens, not texts.
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    return apply(model, saved(config), model_name) if classifier and hasattr(model, "base_model") else model


@contextlib.contextmanager
def quiet_missing_pooler(model_dir: str | Path):
    """Loading a mean-pooled export: transformers' load report would list the [CLS] pooler
    (left out of the export, replaced right after the load) as newly initialised weights."""
    config = Path(model_dir) / "config.json"
    try:
        mean = config.is_file() and json.loads(config.read_text()).get(CONFIG_KEY) == "mean"
    except (OSError, ValueError, AttributeError):  # not a JSON object: the load below says what is wrong with it
        mean = False
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    if mean:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
