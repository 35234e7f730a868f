"""LoRA (peft) for both tasks: wrap a model, count what trains, and export.

Export never calls save_pretrained on the live (possibly ZeRO-3-sharded) model,
which is how other tools end up writing an empty adapter: every rank gathers the
full state dict first (checkpoint.export_model), then rank 0 loads it into a fresh,
whole copy and writes from that: `adapter/` (adapter weights + the trained head),
the merged full model beside it, and `base/` when the base weights exist nowhere
else (a randomly initialised tiny model).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def apply(model, lora_cfg, task: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from launcher.errors import ConfigError

    from transformers.pytorch_utils import Conv1D

    # The layers LoRA adapts: linear ones (GPT-2's are Conv1D: its c_attn was refused) and the
    # embeddings; named as peft matches them, by the end of their dotted names (q_proj,
    # self_attn.q_proj: the short name alone was compared, and model.norm was "not a module").
    modules = [n for n, _ in model.named_modules() if n]
    layers = [n for n, m in model.named_modules() if n and isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Embedding))]

    def matches(name: str, among: list[str]) -> bool:
        return any(n == name or n.endswith("." + name) for n in among)

    if isinstance(lora_cfg.target_modules, list):
        unknown = [t for t in lora_cfg.target_modules if not matches(t, layers)]
        if unknown:
            short = sorted({n.split(".")[-1] for n in layers})
            raise ConfigError(f"model.lora.target_modules: {', '.join(unknown)} not among the linear or embedding layers "
                              f"of {type(model).__name__} ({', '.join(short)})")
    unknown = [m for m in lora_cfg.modules_to_save if not matches(m, modules)]
    if unknown:
        raise ConfigError(f"model.lora.modules_to_save: {', '.join(unknown)} not a module of {type(model).__name__}")
    targets, layers = lora_cfg.target_modules, lora_cfg.layers_to_transform
    if layers is not None:
        targets = _in_blocks(model, targets, layers)
    new = _new_modules(model, list(lora_cfg.modules_to_save) + _head(task))
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, task_type=PEFT_TASK[task], layers_to_transform=layers,
                        modules_to_save=list(lora_cfg.modules_to_save) + new or None, use_dora=lora_cfg.use_dora,
                        exclude_modules=_trained_whole(model, lora_cfg, task) or None if targets == "all-linear" else None)
    try:
        with _quiet_peft():
            wrapped = get_peft_model(model, config)
    except (ValueError, TypeError) as e:  # whatever peft refuses beyond the names checked above
        raise ConfigError(f"model.lora.target_modules: {str(e).splitlines()[0]}") from None
    setattr(wrapped, "launcher_new_trained", new)  # for the run's description (classification.Task)
    return wrapped


@contextlib.contextmanager
def _quiet_peft():
    """peft's warnings about what launcher handles: GPT-2's Conv1D layers take fan_in_fan_out
    (peft sets it per layer); an adapter on a tied head is merged untied (_untie_adapted_head),
    and its adapter/ holds the head's frozen table (save_embedding_layers)."""
    with warnings.catch_warnings():
        for said in ("fan_in_fan_out is set to", "Model has `tie_word_embeddings=True` and a tied layer",
                     "Setting `save_embedding_layers` to `True`"):
            warnings.filterwarnings("ignore", message=said)
        yield


def new_note(model, name: str, task: str) -> str:
    """The run's line on what apply() added to modules_to_save ("" when nothing)."""
    new = getattr(model, "launcher_new_trained", None)
    if not new:
        return ""
    return (f"LoRA: {', '.join(new)} trained whole{' with the head' if _head(task) else ''} "
            f"(not in {name}'s weights: initialised at random)")


def _head(task: str) -> list[str]:
    """What peft trains whole for the task whatever modules_to_save says: a classifier's head."""
    return ["classifier", "score"] if task == "classification" else []


def _new_modules(model, saved: list[str]) -> list[str]:
    """The modules whose weights the load initialised at random (models.new_weights) and that
    nothing would train: the modules_to_save LoRA adds them to. Frozen, they are noise every
    text goes through: DeBERTa-v3's checkpoint has no pooler, and its classifier reads the
    pooler's output (a target list left it frozen; all-linear put a rank-r adapter on it). peft
    trains whole every module whose name ends in a modules_to_save entry, and what sits under it."""
    fresh = {key.rsplit(".", 1)[0] for key in getattr(model, "launcher_new_weights", ())}
    modules = dict(model.named_modules())
    covered = _saved(model, saved)
    return sorted(m for m in fresh if m in modules and not any(m == c or m.startswith(c + ".") for c in covered))


def _saved(model, saved: list[str]) -> list[str]:
    """The modules peft trains whole for modules_to_save `saved`: every one whose name ends in an entry."""
    return [n for n, _ in model.named_modules() if n and any(n.endswith(s) for s in saved)]


def _trained_whole(model, lora_cfg, task: str) -> list[str]:
    """The linear layers peft trains whole, which all-linear must leave without an adapter: peft
    keeps every module whose name ends in a modules_to_save entry (a classifier's "classifier"
    and "score" among them) and refuses an adapter under it. DistilBERT's pre_classifier ends in
    "classifier": all-linear put LoRA on it, then peft failed with a TypeError."""
    return sorted({n.split(".")[-1] for n in _saved(model, list(lora_cfg.modules_to_save) + _head(task))})


def _in_blocks(model, targets, layers: list[int]) -> list[str]:
    """The target names for layers_to_transform, checked against the model's blocks. peft
    takes only a list of names with it: "all-linear" becomes every linear layer inside a
    numbered block (the head and a pooler sit outside any block)."""
    import re

    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    from launcher.errors import ConfigError

    in_block, stacks, n_blocks = set(), set(), 0  # linear leaf names inside blocks; their stacks; block count
    for name, module in model.named_modules():
        block = re.search(r"\.(\d+)\.", name)
        if block and isinstance(module, (torch.nn.Linear, Conv1D)):
            in_block.add(name.split(".")[-1])
            stacks.add(name[: block.start()])
            n_blocks = max(n_blocks, int(block.group(1)) + 1)
    if len(stacks) > 1:  # peft would adapt block N of every stack (an encoder's and a decoder's)
        raise ConfigError(f"model.lora.layers_to_transform: {type(model).__name__} has more than one stack of "
                          f"numbered blocks ({', '.join(sorted(stacks))}); leave it unset to adapt every block")
    outside = sorted(n for n in layers if n >= n_blocks)
    if outside:
        has = f"blocks 0-{n_blocks - 1}" if n_blocks else "no numbered blocks with linear layers"
        raise ConfigError(f"model.lora.layers_to_transform: {', '.join(map(str, outside))} not a block of "
                          f"{type(model).__name__} ({has})")
    if targets != "all-linear":
        return list(targets)
    return sorted(in_block)


def _untie_adapted_head(peft_model) -> None:
    """A LoRA adapter on one of a tied pair, the output head and the input embeddings (SmolLM2's,
    GPT-2's, with lm_head or embed_tokens / wte among target_modules), trained that one alone: the
    head as E + BA with the embeddings E, or the other way round. Merged into the one shared
    tensor, the adapter changed both, and the merged export (still tied) was another model than
    the one trained. The plain head gets its own copy of E first, and the export is untied: both
    tables saved, as trained. (modules_to_save's head is a trained copy already.)"""
    import torch

    model = peft_model.get_base_model()
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None:
        return
    plain_head = getattr(head, "base_layer", head)  # (peft's LoRA layers keep the wrapped layer here)
    plain_embeddings = getattr(embeddings, "base_layer", embeddings)
    if (plain_head is head and plain_embeddings is embeddings) or not isinstance(plain_head, torch.nn.Linear):
        return
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    if not any(getattr(c, "tie_word_embeddings", False) for c in configs) \
            and plain_head.weight.data_ptr() != plain_embeddings.weight.data_ptr():
        return
    plain_head.weight = torch.nn.Parameter(plain_head.weight.detach().clone(), requires_grad=False)
    for c in configs:
        c.tie_word_embeddings = False


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _name_the_base(path: Path, base_name: str | None) -> None:
    """adapter_config.json's base as model.name gave it (a local directory by its absolute path),
    the same from the run's export and from `launcher export`: peft wrote where the base was
    loaded from, a data cache's copy or a checkpoint's skeleton (rotated away later), or nothing.
    A random base has no name to give (model/base/ holds it). modules_to_save once each, and
    target_modules (a set to peft) sorted: two exports of one run write the same file."""
    import json

    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = None
    if base_name is not None:
        local = Path(base_name).expanduser()
        config["base_model_name_or_path"] = str(local.absolute()) if local.exists() else base_name
    if isinstance(config.get("modules_to_save"), list):
        config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write(peft_config, state_dict: dict, out_dir: Path, base_config, model_class, save_base: bool, base=None,
          dtype: str | None = None, base_name: str | None = None) -> None:
    """Rank 0: adapter/, the merged model in out_dir, and base/ if asked, from a gathered
    state dict. Call where model construction is not partitioned (runtime.model_init).
    base: the frozen base model when state_dict lacks it (a checkpoint of trainable state).

    No second copy of the weights: without `base`, the model is a skeleton on the meta device
    whose parameters become the gathered tensors (load_state_dict(assign=True)), and peft
    merges each adapter into its weight in place. Only a random tiny base, which must also
    be written unmerged (base/), is merged on a copy."""
    import torch
    from peft import get_peft_model

    from launcher import models

    if base is None and not save_base:
        with torch.device("meta"):
            base = models.from_config(model_class, base_config)
        with _quiet_peft():
            fresh = get_peft_model(base, copy.deepcopy(peft_config))
        missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
        still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
        if still_meta:
            raise RuntimeError(f"LoRA export: the gathered state lacks {still_meta[:5]}")
    else:
        base = base if base is not None else models.from_config(model_class, base_config)
        with _quiet_peft():
            fresh = get_peft_model(base, copy.deepcopy(peft_config))
        # Each trained weight in the dtype it trained in: under bf16 the base is read in bf16, as
        # the run held it, and peft's copy of the head is made from it, where the run's is fp32;
        # loaded into that copy, the trained head came out rounded to bf16.
        for name, param in fresh.named_parameters():
            if name in state_dict and param.dtype != state_dict[name].dtype:
                param.data = param.data.to(state_dict[name].dtype)
        missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or "modules_to_save" in k]:
        raise RuntimeError(f"LoRA state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype:  # checkpoint.export_dtype: adapters, base and merged model alike
        fresh.to(getattr(torch, dtype))
    with _quiet_peft():
        fresh.save_pretrained(out_dir / "adapter", safe_serialization=True)
    _name_the_base(out_dir / "adapter" / "adapter_config.json", None if save_base else base_name)
    if save_base:  # random initial weights: the adapter is only usable with these
        copy.deepcopy(fresh).unload().save_pretrained(out_dir / "base", safe_serialization=True)
    _untie_adapted_head(fresh)
    fresh.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
