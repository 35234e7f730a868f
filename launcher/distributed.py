"""The launch side of a run: accelerate YAML + DeepSpeed JSON, read, cross-checked, resolved.

The run config owns every number (micro/global batch, accumulation, clipping,
precision); the DeepSpeed JSON owns the sharding policy and says "auto" for those
numbers; the accelerate YAML says how many processes on how many machines and
which engine. `check` finds every contradiction between the three before any
process group starts (one line each, naming the file and key), and
`resolve_deepspeed` fills each "auto" from the run config, so the engine never
falls back to a default of its own (accelerate would fill gradient_clipping with 1.0).

Two readers build the same `LaunchConfig`: `from_yaml` (for `launcher plan` and
scripts) and `from_env` (inside `accelerate launch`, from the variables it exports).
Nothing here imports torch.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from launcher.errors import ConfigError

if TYPE_CHECKING:
    from launcher.config import ModelConfig, RunConfig, TrainConfig

AUTO = "auto"
DEEPSPEED, FSDP = "DEEPSPEED", "FSDP"
# Keys of an accelerate YAML's deepspeed_config that duplicate a DeepSpeed JSON key:
# accelerate refuses them next to deepspeed_config_file, so the JSON is their only home.
YAML_DS_KEYS = {
    "zero_stage": "zero_optimization.stage",
    "offload_optimizer_device": "zero_optimization.offload_optimizer.device",
    "offload_param_device": "zero_optimization.offload_param.device",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping",
    "zero3_save_16bit_model": "zero_optimization.stage3_gather_16bit_weights_on_model_save",
}
_ENV_DS = {  # what `accelerate launch` exports for each deepspeed_config key
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
}
# Sections the run config owns: launcher builds AdamW and the LR schedule from train.*.
_OWNED_SECTIONS = {"optimizer": "train.lr / train.weight_decay", "scheduler": "train.scheduler / train.warmup_*"}


@dataclass
class LaunchConfig:
    source: str  # the accelerate YAML, or a description of the launch environment
    distributed_type: str = "NO"  # NO | MULTI_CPU | MULTI_GPU | DEEPSPEED | FSDP
    num_processes: int = 1  # world size, all machines together
    num_machines: int = 1
    mixed_precision: str = "no"
    ds_source: str | None = None  # the DeepSpeed JSON (or the YAML, when its keys define the config)
    ds: dict | None = None  # the DeepSpeed config as written, "auto" intact
    ds_yaml_fields: dict = field(default_factory=dict)  # YAML keys that duplicate the JSON
    zero3_init: bool | None = None
    fsdp_version: int | None = None  # 1 or 2 under FSDP (accelerate's default is 1)
    use_cpu: bool = False  # the YAML's use_cpu: the processes run on CPU whatever the machine has
    problems: list[str] = field(default_factory=list)  # found while reading the files

    @property
    def uses_deepspeed(self) -> bool:
        return self.distributed_type == DEEPSPEED

    @property
    def zero_stage(self) -> int | None:
        return _get(self.ds, "zero_optimization.stage") if self.ds else None

    def ds_where(self, key: str) -> str:
        return f"{self.ds_source}: {key}"

    @property
    def processes_per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))


# ---------------------------------------------------------------- reading


def _get(tree: dict | None, dotted: str, default=None):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def read_deepspeed_json(path: str, named_by: str) -> tuple[dict | None, list[str]]:
    p = Path(path)
    if not p.is_file():
        return None, [f"{named_by}: {path}: file not found (relative paths are read from the working directory)"]
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        return None, [f"{path}:{e.lineno}: invalid JSON: {e.msg}"]
    if not isinstance(data, dict):
        return None, [f"{path}: expected a JSON object"]
    return data, []


def _ds_from_yaml_keys(fields: dict) -> dict:
    """The DeepSpeed config accelerate builds when the YAML gives keys instead of a JSON file."""
    def number(key: str, kind):  # from the environment every value is a string
        value = fields.get(key, AUTO)
        try:
            return AUTO if value in (AUTO, None, "", "none") else kind(value)
        except (TypeError, ValueError):
            return value  # left for `check` to report

    ds: dict = {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": number("gradient_accumulation_steps", int),
        "gradient_clipping": number("gradient_clipping", float),
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO},
        "zero_optimization": {"stage": int(fields.get("zero_stage", 2))},
    }
    for key in ("offload_optimizer_device", "offload_param_device"):
        if str(fields.get(key, "none")).lower() != "none":
            _set(ds, YAML_DS_KEYS[key], str(fields[key]).lower())
    if str(fields.get("zero3_save_16bit_model", "false")).lower() == "true":
        _set(ds, YAML_DS_KEYS["zero3_save_16bit_model"], True)
    return ds


def _attach_deepspeed(launch: LaunchConfig, fields: dict, config_file: str | None, label: str) -> None:
    """Fill the DeepSpeed side of `launch` from deepspeed_config fields (YAML or environment)."""
    if config_file:
        launch.ds_source = config_file
        launch.ds, problems = read_deepspeed_json(config_file, f"{label}deepspeed_config_file")
        launch.problems += problems
        launch.ds_yaml_fields = {k: v for k, v in fields.items() if k in YAML_DS_KEYS}
    else:
        launch.ds_source = f"{launch.source} (deepspeed_config)"
        launch.ds = _ds_from_yaml_keys(fields)


def _one_process_problems(path: str, data: dict, launch: LaunchConfig) -> list[str]:
    """Configs with which accelerate launch starts one process per machine, whatever the counts."""
    if launch.num_processes > 1 and (data.get("use_cpu") or launch.distributed_type == "MULTI_CPU"):
        return [f"{path}: {'use_cpu: true' if data.get('use_cpu') else 'distributed_type: MULTI_CPU'} with num_processes "
                f"{launch.num_processes}: accelerate launch starts ONE process; for CPU ranks use distributed_type: "
                "MULTI_GPU without use_cpu (as configs/accelerate/cpu_ddp.yaml does)"]
    if (launch.num_processes > 1 or launch.num_machines > 1) and launch.distributed_type == "NO":
        # accelerate's simple launcher: each machine would run a whole training of its own,
        # every one writing the same run directory
        return [f"{path}: distributed_type: NO with {launch.num_processes} process(es) on {launch.num_machines} "
                "machine(s): accelerate launch starts ONE process on each machine, each a separate one-process "
                "training; use a distributed config (multi_gpu.yaml, multi_node.yaml, or cpu_ddp.yaml for CPU ranks)"]
    return []


def _per_machine_problems(path: str, launch: LaunchConfig) -> list[str]:
    """accelerate launch starts num_processes // num_machines ranks on each machine: with 3 on 2
    machines the run had 2 ranks, while its batch was checked for 3."""
    n, m = launch.num_processes, launch.num_machines
    if n % m:
        return [f"{path}: num_processes {n} is not a multiple of num_machines {m}: accelerate launch would start "
                f"{n // m} process(es) on each machine, {n // m * m} in all; give machines x processes per machine"]
    return []


def from_yaml(path: str | Path, num_processes: int | None = None, num_machines: int | None = None) -> LaunchConfig:
    """Read an accelerate config file; --num_processes/--num_machines style overrides win."""
    path = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"--accelerate-config: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise ConfigError(f"--accelerate-config: {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of accelerate settings")

    def count(key: str, given: int | None) -> int:
        value = given if given is not None else data.get(key)
        value = 1 if value is None else value
        if isinstance(value, str) and value.strip().isdecimal() and value.strip().isascii():  # accelerate passes it on as text
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{path}: {key}: expected a whole number >= 1; got {value!r}")
        return value

    for key in ("deepspeed_config", "fsdp_config"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: {key}: expected a mapping of settings; got {data[key]!r}")
    launch = LaunchConfig(
        source=path,
        distributed_type=str(data.get("distributed_type", "NO")).upper(),
        num_machines=count("num_machines", num_machines),
        mixed_precision=str(data.get("mixed_precision") or "no").lower(),
        use_cpu=data.get("use_cpu") is True,
    )
    launch.num_processes = count("num_processes", num_processes)
    launch.problems += _one_process_problems(path, data, launch) or _per_machine_problems(path, launch)
    if launch.distributed_type == FSDP:
        version = (data.get("fsdp_config") or {}).get("fsdp_version") or 1
        version = int(version) if isinstance(version, str) and version.strip() in ("1", "2") else version
        if isinstance(version, bool) or version not in (1, 2):
            raise ConfigError(f"{path}: fsdp_config.fsdp_version: expected 1 or 2; got {version!r}")
        launch.fsdp_version = version
    ds_fields = dict(data.get("deepspeed_config") or {})
    if launch.uses_deepspeed:
        _attach_deepspeed(launch, ds_fields, ds_fields.get("deepspeed_config_file"), f"{path}: deepspeed_config.")
        launch.zero3_init = ds_fields.get("zero3_init_flag")
    else:
        for key in ("offload_optimizer_device", "offload_param_device"):
            if str(ds_fields.get(key, "none")).lower() != "none":
                launch.problems.append(
                    f"{path}: deepspeed_config.{key} is {ds_fields[key]} but distributed_type is "
                    f"{launch.distributed_type}: offload needs DeepSpeed (use deepspeed_zero3_offload.yaml)"
                )
    return launch


def _parent_config_file() -> str | None:
    """The --config_file given to `accelerate launch` (our parent process), for error messages."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if arg in ("--config_file", "--config-file") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--config_file=", "--config-file=")):
            return arg.split("=", 1)[1]
    return None


def from_env(environ: dict | None = None) -> LaunchConfig:
    """What `accelerate launch` / torchrun told this process, in the same shape as from_yaml."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    source = (_parent_config_file() if environ is None else None) or "accelerate launch"
    launch = LaunchConfig(
        source=source,
        num_processes=world,
        num_machines=max(1, world // max(1, local_world)),
        mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
    )
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        launch.distributed_type = DEEPSPEED
        # Set from the YAML or from flags such as --zero_stage; next to a JSON file each one
        # is a contradiction or a duplicate (accelerate ignores or refuses it).
        fields = {k: env[v] for k, v in _ENV_DS.items() if v in env}
        _attach_deepspeed(launch, fields, env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), f"{source}: deepspeed_config.")
        if "ACCELERATE_DEEPSPEED_ZERO3_INIT" in env:
            launch.zero3_init = env["ACCELERATE_DEEPSPEED_ZERO3_INIT"].lower() == "true"
    elif env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        launch.distributed_type = FSDP
        launch.fsdp_version = int(env.get("FSDP_VERSION") or 1)
    elif world > 1:
        launch.distributed_type = "MULTI_GPU"  # the runtime decides CPU vs GPU; the checks do not care
    return launch


# ---------------------------------------------------------------- checking


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def adopt_precision(cfg: RunConfig, launch: LaunchConfig) -> tuple[RunConfig, str | None]:
    """(the config to run, a line saying what was adopted, or None). Precision has one owner:
    the run config when it says so, else the accelerate YAML's mixed_precision, adopted into a
    copy (the given config is left as it is: whatever was built from it stays true). Both set
    and different: `check`. Resolved once, before anything is built from the config."""
    import dataclasses

    if launch.mixed_precision in ("bf16", "fp16") and "train.precision" not in cfg.explicit \
            and cfg.train.precision != launch.mixed_precision:
        precision: Any = launch.mixed_precision  # bf16 or fp16, as tested above
        adopted = cfg.replace(train=dataclasses.replace(cfg.train, precision=precision))
        return adopted, f"train.precision: {launch.mixed_precision}, adopted from {launch.source} (mixed_precision)"
    return cfg, None


def _ds_number_problems(ds: dict, where: Callable[[str], str], t: TrainConfig, world: int) -> list[str]:
    """The DeepSpeed JSON's batch sizes, clipping and precision against the run config's
    (each may be "auto", which launcher fills)."""
    out: list[str] = []
    if world > 0 and t.global_batch_size % (t.micro_batch_size * world) == 0:
        accumulation = t.global_batch_size // (t.micro_batch_size * world)
        numbers = {
            "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
            "gradient_accumulation_steps": (accumulation, f"derived from train.global_batch_size / (train.micro_batch_size x {world} processes)"),
            "train_batch_size": (t.global_batch_size, "train.global_batch_size"),
            "gradient_clipping": (t.max_grad_norm or 0.0, "train.max_grad_norm"),
        }
        for key, (ours, owner) in numbers.items():
            value = ds.get(key, AUTO)
            if value != AUTO and _num(value) != float(ours):
                out.append(f"{where(key)}: {json.dumps(value)} but the run has {ours} ({owner}); use \"auto\"")
    for dtype in ("bf16", "fp16"):
        enabled = _get(ds, f"{dtype}.enabled", AUTO)
        if enabled == AUTO:
            continue
        if bool(enabled) and t.precision != dtype:
            out.append(f"{where(dtype + '.enabled')}: true but train.precision is {t.precision}; use \"auto\"")
        if not bool(enabled) and t.precision == dtype:
            out.append(f"{where(dtype + '.enabled')}: false but train.precision is {dtype}; use \"auto\"")
    return out


def check(t: TrainConfig, model: ModelConfig, launch: LaunchConfig) -> list[str]:
    """Every contradiction between the run config (its train section and model dtype), the
    accelerate YAML and the DeepSpeed JSON; one line each."""
    problems = list(launch.problems)
    world = launch.num_processes
    if launch.mixed_precision in ("bf16", "fp16") and launch.mixed_precision != t.precision:
        problems.append(
            f"{launch.source}: mixed_precision is {launch.mixed_precision} but train.precision is {t.precision} "
            "(the run config decides precision: remove it here or set train.precision)"
        )
    if not launch.uses_deepspeed or launch.ds is None:
        return problems

    ds, where = launch.ds, launch.ds_where
    for key, value in launch.ds_yaml_fields.items():
        json_key = YAML_DS_KEYS[key]
        in_json = _get(ds, json_key)
        clash = (
            f"is {value} but {launch.ds_source} sets {json_key} to {json.dumps(in_json)}"
            if in_json not in (None, AUTO) and str(in_json).lower() != str(value).lower()
            else f"duplicates {launch.ds_source} ({json_key}); accelerate refuses both"
        )
        problems.append(f"{launch.source}: deepspeed_config.{key} {clash}: keep it in the JSON only")
    for section, owner in _OWNED_SECTIONS.items():
        if section in ds:
            problems.append(f"{where(section)}: the run config owns this ({owner}); remove the section")
    if "zero_optimization" not in ds:
        problems.append(f"{where('zero_optimization')}: missing (set at least its stage)")
        return problems
    stage = _get(ds, "zero_optimization.stage")
    if stage not in (0, 1, 2, 3):
        problems.append(f"{where('zero_optimization.stage')}: {json.dumps(stage)} is not a ZeRO stage (0, 1, 2 or 3)")
        return problems
    problems += _ds_number_problems(ds, where, t, world)
    offload_param = str(_get(ds, "zero_optimization.offload_param.device", "none")).lower()
    offload_opt = str(_get(ds, "zero_optimization.offload_optimizer.device", "none")).lower()
    if offload_param != "none" and stage != 3:
        problems.append(f"{where('zero_optimization.offload_param')}: parameter offload needs stage 3 (stage is {stage})")
    if offload_opt != "none" and stage == 0:
        problems.append(f"{where('zero_optimization.offload_optimizer')}: optimizer offload needs stage 1, 2 or 3")
    if stage == 3 and _get(ds, YAML_DS_KEYS["zero3_save_16bit_model"]) is not True:
        inline = (launch.ds_source or "").endswith("(deepspeed_config)")
        key = "deepspeed_config.zero3_save_16bit_model" if inline else YAML_DS_KEYS["zero3_save_16bit_model"]
        src = launch.source if inline else launch.ds_source
        problems.append(f"{src}: {key} must be true under ZeRO-3: the final export gathers the whole model")
    return problems


# ---------------------------------------------------------------- resolving "auto"


def resolve_deepspeed(t: TrainConfig, launch: LaunchConfig, policy: dict[str, tuple[Any, str]],
                      ) -> tuple[dict, list[tuple[str, Any, str]]]:
    """The DeepSpeed config with every run-owned "auto" filled from the train section, and the
    engine's `policy` (key -> (value, from); engines.deepspeed_config gives its own) filled
    where the JSON leaves the key unset; and (key, value, from) for each fill.

    Size-based keys (reduce_bucket_size, stage3_*) stay "auto": accelerate derives
    them from the model's hidden size when the engine starts.
    """
    ds = copy.deepcopy(launch.ds or {})
    accumulation = t.global_batch_size // (t.micro_batch_size * launch.num_processes)
    fills: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accumulation, f"train.global_batch_size / (micro x {launch.num_processes} processes)"),
        "train_batch_size": (t.global_batch_size, "train.global_batch_size"),
        "gradient_clipping": (float(t.max_grad_norm or 0.0), "train.max_grad_norm (null = off)"),
        "bf16.enabled": (t.precision == "bf16", "train.precision"),
        "fp16.enabled": (t.precision == "fp16", "train.precision"),
    }
    fills |= policy
    resolved: list[tuple[str, Any, str]] = []
    for key, (value, owner) in fills.items():
        if _get(ds, key, AUTO) == AUTO:
            _set(ds, key, value)
            resolved.append((key, value, owner))
    for key in ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.stage3_param_persistence_threshold"):
        if _get(ds, key) == AUTO:
            formula = {"reduce_bucket_size": "hidden_size^2", "stage3_prefetch_bucket_size": "0.9 x hidden_size^2",
                       "stage3_param_persistence_threshold": "10 x hidden_size"}[key.split(".")[-1]]
            resolved.append((key, AUTO, f"accelerate at start: {formula} of the model"))
    return ds, resolved
