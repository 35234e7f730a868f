"""Where pretrained models come from: one room for loading, so no task imports another to load one.

A model source is a hub id, a local Hugging Face directory, or a GGUF file (a `.gguf` path, or
a directory holding exactly one `.gguf` and no config.json). transformers reads GGUF by
dequantizing every tensor into a model that refuses `save_pretrained` and HF Trainer, although
its weights are plain floats. So a GGUF source is converted once into a plain Hugging Face
directory (safetensors, float32, tokenizer with its chat template) in the run's cache
(hub.resolve: one process per node builds it, as for data) and every rank loads that.

`from_pretrained` turns every failure into one line (ConfigError) that says which of these it
was: not a model directory, not found on the hub, gated, no network, or not a readable GGUF.
"""

from __future__ import annotations

import copy
import json
import functools
import os
import sys
from pathlib import Path

from launcher.errors import ConfigError


def inference_device():
    """Where eval, predict and generate run: the first GPU when there is one (LAUNCHER_DEVICE overrides)."""
    import torch

    return torch.device(os.environ.get("LAUNCHER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------- a local base, as read

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def local_weights(name: str) -> dict | None:
    """A local model's weights as a run reads them: the absolute path, and a digest of each
    weight file's name, size and SAMPLES blocks of SAMPLE_BYTES spread over it (a stat and
    1 MiB read per file, not the whole file: another model of the same shapes differs in
    every block, a copy in none). None for a hub name (its revision pins it) or a path
    without weight files. A LoRA checkpoint holds only what trained: the base it merges onto
    is read again from here (resume, `launcher export`), and this says whether it is the same."""
    import hashlib

    path = Path(name).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(json.dumps([file.name, size]).encode())
        with open(file, "rb") as f:
            for i in range(SAMPLES):
                f.seek(max(0, size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return {"path": str(path.resolve()), "digest": digest.hexdigest()[:32]}


def same_base(name: str, recorded: dict | None, where: str, fix: str, also: str | None = None) -> str:
    """Where the local base `recorded` (local_weights when the checkpoint was written) is now:
    `name`, else `also` when given; ConfigError when neither holds it. Nothing recorded (a hub
    base, an older checkpoint): `name`, unchecked."""
    if not recorded:
        return name

    def why(path: str) -> str | None:
        now = local_weights(path)
        return "no weight files there now" if now is None else None if now["digest"] == recorded.get("digest") else \
            "its weight files differ"

    if (said := why(name)) is None:
        return name
    if also is not None and Path(also).resolve() != Path(name).expanduser().resolve():
        if (elsewhere := why(also)) is None:
            return also
        said += f", and {also}, where the run read it: {elsewhere}"
    else:
        said += f"; it was read from {recorded.get('path')}"
    raise ConfigError(f"{where}: {name} is not the frozen base this LoRA checkpoint was trained on ({said}): its adapters "
                      f"would be merged onto another model; {fix}")


# ---------------------------------------------------------------- GGUF


def gguf_source(name: str) -> Path | None:
    """The GGUF file `name` stands for: a `.gguf` file, or a directory with exactly one `.gguf`
    and no config.json (e.g. the folder a package installs it in); None for anything else."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
    return None


def is_model_folder(folder: Path) -> bool:
    """A folder a loader reads as a model: a Hugging Face model (config.json), a PEFT adapter
    (adapter_config.json) or one GGUF file (gguf_source)."""
    return ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
            or gguf_source(str(folder)) is not None)


# The layout convert_gguf writes; raised when it changes, so a data cache converts again.
# 2: a tied output head is written under the embeddings' name (1 wrote it as lm_head.weight).
CONVERSION_LAYOUT = 2


def gguf_fingerprint(path: Path) -> dict:
    """What names a conversion: the file (path, size, mtime), the transformers that reads it
    and the layout this launcher writes."""
    import transformers

    st = path.stat()
    return {"gguf": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "transformers": transformers.__version__,
            "layout": CONVERSION_LAYOUT}


def convert_gguf(path: Path, out_dir: Path, stage=lambda text: None) -> None:
    """A plain Hugging Face directory from a GGUF file: config, tokenizer (chat template
    included) and float32 safetensors. transformers dequantizes every tensor on load and then
    marks the model quantized, which only blocks saving: the marks are dropped, the weights
    are saved as loaded (a reload has identical weights and logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage(f"reading the tokenizer of {path.name}")
    tokenizer = _gguf_load(AutoTokenizer, path)
    stage(f"dequantizing {path.name}")
    model = _gguf_load(AutoModelForCausalLM, path, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    stage(f"writing {path.name} as safetensors")
    write_weights(model, out_dir)
    tokenizer.save_pretrained(out_dir)


def write_weights(model, out_dir: Path) -> None:
    """config.json, generation_config.json and model.safetensors of `model`, written by this
    process whatever its rank. Not save_pretrained: once torch.distributed is up, transformers
    (5.24, `should_save_on_this_rank`) writes nothing on any process but global rank 0, even
    with is_main_process=True, and returns as if it had saved; the conversion is built by
    whichever node's first rank takes the cache lock. Storage shared by tied weights (the
    output head tied to the embeddings) is written once, under the tie's source name (the
    embeddings), as save_pretrained does, and from_pretrained ties it again. Under the head's
    name instead, a class without that head (a sequence classifier on the same checkpoint)
    would find no embeddings and start them from random."""
    from safetensors.torch import save_file

    from transformers.core_model_loading import revert_weight_conversion

    out_dir.mkdir(parents=True, exist_ok=True)
    if not getattr(model.config, "architectures", None):  # the GGUF reader leaves it unset; serving tools read it
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    tensors, seen = {}, set()
    # The checkpoint's own key names, as save_pretrained writes them (fused MoE experts unfused);
    # a tie's targets after every other name, so shared storage keeps its source's name.
    state = revert_weight_conversion(model, model.state_dict())
    targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name in sorted(state, key=lambda n: n in targets):
        tensor = state[name]
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage in seen:
            continue
        seen.add(storage)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _gguf_load(loader, path: Path, **kwargs):
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own tqdm bar, one step per tensor, whatever transformers'
    # progress-bar setting (and TQDM_DISABLE is read when tqdm is imported): silenced here.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        return loader.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    except ImportError as e:  # the gguf package is missing
        raise ConfigError(f"model.name: {path}: reading GGUF files needs the gguf package "
                          f"(pip install gguf; make venv installs it) [{str(e).splitlines()[0][:120]}]") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"model.name: {path}: not a GGUF file transformers can read "
                          f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    finally:
        gguf_utils.tqdm = bar
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- loading


# (name, revision) -> the local directory this process loads instead: a hub snapshot or a GGUF
# conversion that hub.resolve made on this node.
LOCAL: dict[tuple[str, str | None], str] = {}


def local_dir(name: str, revision: str | None) -> str | None:
    """Where hub.resolve put (name, revision) on this node, if it did."""
    return LOCAL.get((name, revision))


_configs: dict = {}  # (loader, GGUF path, mtime) -> its config, read once per process


def remote_code_gate(model_dir: str | Path, trusted: bool, flag: str = "--trust-remote-code") -> dict:
    """from_pretrained's trust_remote_code for a local model directory. A directory whose
    config.json or tokenizer_config.json maps classes to Python files shipped beside it
    (`auto_map`) runs those files when loaded: refused in one line unless `trusted`."""
    shipped = set()
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue  # the loader itself says what is wrong with the file
        for ref in (auto_map or {}).values():
            for item in ref if isinstance(ref, list) else [ref]:
                # "module.Class" names a file beside the model; "repo--module.Class" another
                # repository's (fetched only with trust_remote_code, never offline); a file that
                # is not there (a config that keeps auto_map for a class transformers has) runs nothing.
                if isinstance(item, str) and "--" not in item and (Path(model_dir) / (item.split(".")[0] + ".py")).is_file():
                    shipped.add(item.split(".")[0] + ".py")
    if shipped and not trusted:
        raise ConfigError(f"{model_dir}: loading it runs Python code shipped with the model ({', '.join(sorted(shipped))}, "
                          f"named by auto_map); pass {flag} if you trust it")
    return {"trust_remote_code": bool(trusted)}


def from_config(auto, config, **kwargs):
    """A model built from its config alone (random or meta weights): `auto` is an Auto class or
    a model class. With from_pretrained, every model launcher builds is built here, so a
    classifier always reads a text the way its config records (launcher.tasks.pooling)."""
    from launcher.tasks import pooling

    build = auto.from_config if hasattr(auto, "from_config") else auto._from_config
    return pooling.follow(build(config, **kwargs))


def model_class(auto, config):
    """The class an Auto class builds for a config, or None (remote code, an unknown config)."""
    try:
        return auto._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def from_pretrained(loader, name: str, model_cfg=None, **kwargs):
    """loader.from_pretrained(name), or one line saying which kind of failure it was.
    `model_cfg` adds model.revision and model.trust_remote_code (off unless asked), and
    model.pooling, recorded in the config or model loaded. A model reads a text the way its
    config records (launcher.tasks.pooling), as from_config's do. A hub model or GGUF file that
    hub.resolve made local is read from there; a GGUF file nobody converted (`launcher plan`,
    `launcher export` of a LoRA checkpoint) is read directly."""
    from transformers import PretrainedConfig

    from launcher.tasks import pooling

    with pooling.quiet_missing_pooler(local_dir(name, getattr(model_cfg, "revision", None)) or name):
        loaded = _from_pretrained(loader, name, model_cfg, **kwargs)
    if kwargs.get("output_loading_info"):  # (model, what the load had to initialise)
        loaded, info = loaded
        loaded.launcher_new_weights = new_weights(info)
    config = loaded if isinstance(loaded, PretrainedConfig) else getattr(loaded, "config", None)
    if model_cfg is not None and isinstance(config, PretrainedConfig):
        pooling.record(config, getattr(model_cfg, "pooling", None))
    followed = pooling.follow(loaded, name)
    if getattr(followed, "launcher_new_weights", None):  # not those a mean pooler took the place of
        held = {key for key, _ in followed.named_parameters()}
        followed.launcher_new_weights = [key for key in followed.launcher_new_weights if key in held]
    return followed


def not_a_model_dir(path: str | Path) -> str:
    """The line for a MODEL_DIR that is not a directory: a file given for its folder (a GGUF
    file, model.safetensors) said "no such model directory" of a file that exists."""
    path = Path(path)
    if path.is_file():
        return f"{path}: a file, not a model directory; give the folder that holds it ({path.parent})"
    return f"{path}: no such model directory"


def export_meta(model_dir: str | Path, given: str = "MODEL_DIR") -> dict:
    """An export's (or a checkpoint skeleton's) launcher.json ({} when it has none); a file that
    is not a JSON object is one line naming it and the argument `given` (it was a
    JSONDecodeError or AttributeError traceback)."""
    path = Path(model_dir) / "launcher.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{given}: {path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{given}: {path}: not a JSON object (launcher writes one beside every export)")
    if meta.get("task") not in (None, "classification", "causal_lm"):  # (an unknown one was read as a classifier)
        raise ConfigError(f"{given}: {path}: task: expected classification or causal_lm; got {meta['task']!r}")
    length, weights = meta.get("max_length"), meta.get("class_weights")  # (a TypeError deep in eval before)
    if length is not None and (type(length) is not int or length < 1):
        raise ConfigError(f"{given}: {path}: max_length: expected a whole number >= 1 or null; got {length!r}")
    if weights is not None and not (isinstance(weights, list)
                                    and all(type(w) in (int, float) and w >= 0 for w in weights)):
        raise ConfigError(f"{given}: {path}: class_weights: expected a list of numbers >= 0 or null; got {weights!r}")
    for key in ("text_column", "label_column"):  # (absent: an export from before they were recorded)
        if meta.get(key) is not None and not (isinstance(meta[key], str) and meta[key].strip()):
            raise ConfigError(f"{given}: {path}: {key}: expected a column name or null; got {meta[key]!r}")
    return meta


def task_by_what_it_is(folder: str | Path) -> str:
    """causal_lm or classification for a model folder without launcher.json (saved by plain
    transformers or peft): a GGUF file (transformers reads one as a causal LM), a PEFT
    adapter's task_type, or config.json's architectures among transformers' causal-LM class
    names (GPT2LMHeadModel too) or named *ForCausalLM. A causal LM was answered by a random
    classifier head before."""
    folder = Path(folder)
    if gguf_source(str(folder)) is not None:
        return "causal_lm"

    def read(name: str, key: str):
        try:
            return json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):  # (the loader says what is wrong with it)
            return None

    if not (folder / "config.json").is_file():  # a PEFT adapter's folder
        return "causal_lm" if read("adapter_config.json", "task_type") == "CAUSAL_LM" else "classification"
    architectures = read("config.json", "architectures") or []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    causal = {n for names in CAUSAL.values() for n in ([names] if isinstance(names, str) else names)}
    return "causal_lm" if any(a in causal or str(a).endswith("ForCausalLM") for a in architectures) else "classification"


def exported(loader, model_dir: str, **kwargs):
    """from_pretrained of an export (eval, predict, generate): its problems name MODEL_DIR, the
    argument given, not model.name, which the user did not set."""
    try:
        loaded = from_pretrained(loader, model_dir, **kwargs)
    except ConfigError as e:
        raise ConfigError(*(p.replace("model.name: ", "MODEL_DIR: ", 1) for p in e.problems)) from None
    if loader.__name__ == "AutoTokenizer" and len(loaded) <= len(set(loaded.all_special_ids)):
        # a folder without its tokenizer files: transformers built an empty one from config.json
        # (BERT's: 5 special tokens), and every word was [UNK], scored without a word
        raise ConfigError(f"MODEL_DIR: {model_dir}: its tokenizer has no tokens but special ones (its tokenizer files, "
                          "tokenizer.json or vocab.txt and the like, are missing); copy them from the export")
    return loaded


def new_weights_note(model, name: str) -> str:
    """The run's line on the weights the load initialised at random (a classifier's new head),
    "" when none: transformers' own report of them is a warning, which launcher silences
    (cli.main sets TRANSFORMERS_VERBOSITY=error unless set)."""
    fresh = list(getattr(model, "launcher_new_weights", None) or ())
    if not fresh:
        return ""
    shown = ", ".join(fresh[:4]) + (f" and {len(fresh) - 4} more" if len(fresh) > 4 else "")
    return f"model: {shown} not in {name}'s weights: initialised at random"


def warn_new_weights(model, model_dir: str) -> None:
    """eval / predict / generate on a folder whose load initialised weights at random (a plain
    encoder's folder: a random head; a causal LM saved without its untied head): one warning on
    stderr, as transformers' own report, which launcher silences, would have said."""
    fresh = new_weights_note(model, model_dir)
    if fresh:
        print(f"warning: {fresh.removeprefix('model: ')}: these answers are not all a trained model's", file=sys.stderr)


def new_weights(info: dict) -> list[str]:
    """The weights a load initialised at random, from transformers' loading info: absent from the
    checkpoint (a classifier's head; DeBERTa-v3's pooler, which its masked-LM checkpoint lacks) or
    of another shape there (a head with another label count)."""
    return sorted(set(info.get("missing_keys") or ()) | {k[0] for k in info.get("mismatched_keys") or ()})


def _from_pretrained(loader, name: str, model_cfg=None, **kwargs):
    source = name
    if model_cfg is not None:
        kwargs.setdefault("trust_remote_code", bool(model_cfg.trust_remote_code))
        source = local_dir(name, model_cfg.revision) or name  # fetched or converted once per node
        if model_cfg.revision and source == name:
            kwargs.setdefault("revision", model_cfg.revision)
    gguf = gguf_source(source)
    if gguf is not None:
        kwargs.pop("trust_remote_code", None)
        key = (loader.__name__, str(gguf), gguf.stat().st_mtime_ns)
        if not kwargs and loader.__name__ == "AutoConfig" and key in _configs:  # reading GGUF metadata takes seconds
            return copy.deepcopy(_configs[key])
        model = _gguf_load(loader, gguf, **kwargs)
        if not kwargs and loader.__name__ == "AutoConfig":
            _configs[key] = copy.deepcopy(model)
        loaded = model[0] if isinstance(model, tuple) else model  # (model, loading info)
        if hasattr(loaded, "hf_quantizer"):  # a model: its weights are plain floats now
            loaded.hf_quantizer, loaded.is_quantized = None, False
            if hasattr(loaded.config, "quantization_config"):
                del loaded.config.quantization_config
        return model
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # (a damaged weights file: SafetensorError)
        if isinstance(e, SafetensorError) and Path(source).expanduser().is_dir():
            said = " ".join(str(e).split())[:200]
            raise ConfigError(f"model.name: {name}: its weights file is damaged (cut short or overwritten?): {said}") from None
        if source != name:  # the snapshot is on disk: whatever failed, it was not the network
            said = " ".join(str(e).split())[:300] or type(e).__name__
            raise ConfigError(f"model.name: '{name}' is downloaded ({source}) but does not load: {said}") from None
        raise ConfigError(hub_problem(name, e)) from None


# The module names of learned absolute position tables (BERT, RoBERTa and kin; GPT-2; OPT):
# a token past the table's end indexes outside it. Rotary and relative positions have no table.
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model) -> int | None:
    """The tokens a model with a learned absolute position table can read (RoBERTa's starts
    after its padding index), or None."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            pad = module.padding_idx  # OPT, BART and kin shift their positions by an offset instead
            return module.num_embeddings - (pad + 1 if pad is not None else 0) - getattr(module, "offset", 0)
    return None


def check_positions(model, max_length: int, name: str) -> None:
    """data.max_length within the model's position table: past it the first long row fails
    inside the embedding (an index error; a device assert on GPU), not as one line here."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length: {max_length} is more tokens than {name} has positions for ({limit}); "
                          f"set data.max_length={limit} or less")


def pad_with_eos(tokenizer, effect: str) -> str:
    """A tokenizer without a pad token (most decoder LLMs') pads with its EOS token, which the
    caller has checked exists. Returns the run's one line saying so and what padding does
    (`effect`), or "" when the tokenizer has a pad token."""
    if tokenizer.pad_token_id is not None:
        return ""
    tokenizer.pad_token = tokenizer.eos_token
    return f"tokenizer has no pad token: padding with EOS (id {tokenizer.eos_token_id}), {effect}"


def export_dtype(setting: str, declared=None) -> str:
    """checkpoint.export_dtype resolved, for the run and for `launcher plan` alike: auto is the
    dtype the base model's config declares (`declared`: None for a random tiny model, or a
    config that declares none or another dtype: float32)."""
    if setting != "auto":
        return setting
    name = str(declared or "float32").replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def declared_dtype(model_cfg) -> str | None:
    """The dtype model.name's config.json declares (`dtype`, or transformers 4's `torch_dtype`),
    read from the config alone: a loaded model's config says the dtype it was loaded in."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, model_cfg.name, model_cfg)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


def hub_problem(name: str, error: BaseException) -> str:
    """The one line for a model that would not load (error: what transformers raised)."""
    from huggingface_hub import errors as hub

    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    kinds = tuple(type(x) for x in chain)
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    local = Path(name).expanduser()
    if local.is_dir() and local.name in ("adapter", "base") and (local.parent / "launcher.json").is_file():
        # (a LoRA export's parts: eval and predict said so, train did not)
        part = "LoRA adapter" if local.name == "adapter" else "frozen base under the LoRA adapter"
        return (f"model.name: {name} is the {part} of the export {local.parent}; give {local.parent} (the merged "
                "model) to train on from it")
    if local.is_dir():
        return f"model.name: {name}: not a loadable Hugging Face model directory ({first})"
    if any(issubclass(k, hub.GatedRepoError) for k in kinds) or "gated repo" in str(error).lower():
        return (f"model.name: '{name}' is gated or needs authorisation on the Hugging Face Hub: accept its licence "
                "there and log in (HF_TOKEN), or pass a local directory: model.name=/path/to/model")
    if any(issubclass(k, hub.RevisionNotFoundError) for k in kinds):
        return f"model.revision: no such revision of '{name}' on the Hugging Face Hub"
    if (any(issubclass(k, (hub.RepositoryNotFoundError, hub.HFValidationError)) for k in kinds)
            or "not a valid model identifier" in str(error)):
        return (f"model.name: '{name}' was not found on the Hugging Face Hub (check the id), nor is it a local "
                "directory: model.name=/path/to/model")
    return (f"model.name: cannot load '{name}' from the Hugging Face Hub (no network, or not cached); "
            "download it where you have access and pass a local directory: model.name=/path/to/model")
