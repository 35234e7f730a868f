"""Hub models: fetched once per node, then loaded from the local snapshot by every rank.

Left to itself, every rank of an 8-GPU node calls from_pretrained(name) at once: eight
processes ask the hub for the same files (and hit its rate limits together), and a
network fault becomes eight different half-downloads. Here one process per Hugging Face
cache fetches the snapshot with huggingface_hub: global rank 0 when the nodes share the
cache (a shared file system), else the first process of each node (local rank 0). The
other ranks wait for it on the file system (not in a collective, so a long download cannot run
into the process group's timeout), and every rank then loads the local snapshot directory
with no network at all. A failure on the fetching rank stops its node's other ranks with
the same one line.

What is fetched: configuration and tokenizer files and the safetensors weights (the
PyTorch .bin weights only when the repository has no safetensors; never ONNX, TF, Flax
or OpenVINO copies); the repository's Python files only with model.trust_remote_code.

A GGUF file (models.py) goes the same way: converted once into the run's cache, then read
from there by every rank.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from launcher import models
from launcher.config import TINY_MODEL
from launcher.errors import ConfigError
from launcher.files import write_atomically

SMALL = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*", "*.vocab", "merges.txt"]
WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
BIN_WEIGHTS = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]
CODE = ["*.py"]

def is_hub_name(name: str) -> bool:
    return name != TINY_MODEL and not Path(name).expanduser().is_dir() and not name.lower().endswith(".gguf")


def resolved_revision(name: str, revision: str | None) -> str | None:
    """The commit a resolved hub model was loaded at (its snapshot directory's name)."""
    path = models.local_dir(name, revision)
    return Path(path).name if path else revision


def _index_files(index: Path) -> list[str] | None:
    """The index file and the shards its weight_map names; None without a readable index."""
    try:
        return [index.name, *sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no index, or a broken one: the loader says what is wrong with it


def weight_patterns(snapshot: Path) -> list[list[str]]:
    """The weight files to fetch, in order of preference, once the small files are local.
    A sharded checkpoint's index names its shards exactly, so a repository that also holds a
    consolidated copy (Mistral's `consolidated.safetensors`) is not downloaded twice. Without
    an index: `model.safetensors`, then any safetensors, then the PyTorch .bin files (pickles:
    the last resort), by their own index when there is one."""
    sharded = _index_files(snapshot / "model.safetensors.index.json")
    if sharded:
        return [sharded]
    return [["model.safetensors"], WEIGHTS, _index_files(snapshot / "pytorch_model.bin.index.json") or BIN_WEIGHTS]


def fetch(model_cfg) -> str:
    """Download (or find in the cache) the snapshot of model_cfg.name; its local directory.
    One line (ConfigError) when it cannot: not found, gated, no network, bad revision.
    The small files first (config, tokenizer, weight index), then exactly the weights."""
    from huggingface_hub import constants, snapshot_download

    small = SMALL + (CODE if model_cfg.trust_remote_code else [])
    if not constants.HF_HUB_OFFLINE:  # (launcher turns the hub's bars off: a first download said nothing)
        print(f"fetching {model_cfg.name} from the Hugging Face Hub (or its cache, {constants.HF_HUB_CACHE}); "
              "HF_HUB_DISABLE_PROGRESS_BARS=0 shows the download's progress", flush=True)
    try:
        path = snapshot_download(model_cfg.name, revision=model_cfg.revision, allow_patterns=small)
        for weights in weight_patterns(Path(path)):
            path = snapshot_download(model_cfg.name, revision=model_cfg.revision, allow_patterns=small + weights)
            if any(Path(path).glob("*.safetensors")) or any(Path(path).glob("pytorch_model*.bin")):
                break
    except Exception as e:  # hub, HTTP and validation errors have no common base class
        raise ConfigError(models.hub_problem(model_cfg.name, e)) from None
    return path


def fetch_config(model_cfg) -> str | None:
    """For `launcher plan`: a hub model's config.json (and its code with
    model.trust_remote_code), nothing else, made local for this process (models.LOCAL; from
    the cache when offline). The one line (models.hub_problem) when it cannot be had; None
    for a model that is no hub name, and when it was had. huggingface_hub's snapshot call
    fails at once without a network, where transformers' own file download retries for
    about 25 s, printing each retry."""
    if not is_hub_name(model_cfg.name):
        return None
    from huggingface_hub import snapshot_download

    small = ["config.json"] + (CODE if model_cfg.trust_remote_code else [])
    try:
        models.LOCAL[(model_cfg.name, model_cfg.revision)] = snapshot_download(
            model_cfg.name, revision=model_cfg.revision, allow_patterns=small)
    except Exception as e:  # hub, HTTP and validation errors have no common base class
        return models.hub_problem(model_cfg.name, e)
    return None


def resolve(model_cfg, rt, cache=None) -> bool | None:
    """Make model_cfg.name loadable offline on this node (see the module docstring): True
    where this process fetched it (or converted a GGUF file), False where it waited for its
    node's fetch or conversion, None when there was nothing to do (a model directory, or the
    tiny model). A GGUF file is converted into `cache` (data/cache.py: built by one process
    per cache directory, the others wait on the file system)."""
    key = (model_cfg.name, model_cfg.revision)
    gguf = models.gguf_source(model_cfg.name)
    if gguf is not None and cache is not None:
        path, built = cache.get("model", models.gguf_fingerprint(gguf),
                                lambda tmp, stage: models.convert_gguf(gguf, tmp, stage))
        models.LOCAL[key] = str(path)
        return built
    if not is_hub_name(model_cfg.name):
        return None
    if rt.world_size == 1:
        models.LOCAL[key] = fetch(model_cfg)
        return True
    from huggingface_hub import constants

    token = rt.shared_token()
    where = Path(constants.HF_HUB_CACHE) / ".launcher"
    where.mkdir(parents=True, exist_ok=True)
    # One download per cache, not per node: global rank 0 leaves a file in its cache, and a
    # node that sees it shares that cache (a shared file system), so its ranks wait for rank
    # 0's download instead of fetching the same blobs at the same time.
    probe = where / f"{token}.probe"
    if rt.rank == 0:
        probe.write_text(socket.gethostname())
    rt.barrier()
    shared = probe.is_file()
    fetcher = rt.rank == 0 if shared else rt.local_rank == 0
    peers = rt.world_size if shared else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    stem = where / (token if shared else f"{token}-{socket.gethostname()}")
    done, failed = stem.with_suffix(".done"), stem.with_suffix(".failed")
    if fetcher:
        try:
            path = fetch(model_cfg)
        except ConfigError as e:
            write_atomically(failed, e.problems[0])  # whole: a rank that sees it reads all of it
            _wait_for_acks(stem, peers - 1)
            probe.unlink(missing_ok=True)
            raise
        write_atomically(done, path)
    else:
        path = _wait_for_fetch(stem, rt.rank, f"{'rank 0' if shared else 'local rank 0'} to fetch {model_cfg.name}")
    models.LOCAL[key] = path
    rt.barrier()  # every rank has read the answer: now quick
    if fetcher:
        done.unlink(missing_ok=True)
    if rt.rank == 0:
        probe.unlink(missing_ok=True)
    return fetcher


def _wait_for_fetch(stem: Path, rank: int, what: str) -> str:
    """A rank that does not fetch: the fetched path once `stem`.done appears, or the fetcher's
    one line (ConfigError) from `stem`.failed, acknowledged so the fetcher can clean up."""
    done, failed = stem.with_suffix(".done"), stem.with_suffix(".failed")
    started = last_word = time.monotonic()
    while not done.exists():
        if failed.exists():
            problem = failed.read_text()
            Path(f"{stem}.ack-{rank}").write_text("")
            raise ConfigError(problem)
        if time.monotonic() - last_word > 60:
            print(f"rank {rank}: waiting {time.monotonic() - started:.0f} s for {what}", flush=True)
            last_word = time.monotonic()
        time.sleep(0.2)
    return done.read_text()


def _wait_for_acks(stem: Path, peers: int, limit_s: float = 30.0) -> None:
    """After a failed fetch: let the node's other ranks read the message (each leaves an
    ack), then remove every hand-over file, so nothing is left in the cache."""
    deadline = time.monotonic() + limit_s
    while len(list(stem.parent.glob(f"{stem.name}.ack-*"))) < peers and time.monotonic() < deadline:
        time.sleep(0.1)
    for f in [stem.with_suffix(".failed"), *stem.parent.glob(f"{stem.name}.ack-*")]:
        f.unlink(missing_ok=True)
