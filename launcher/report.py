"""What a person reads: one-line eval summaries, the before/after table, the training plot."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.files import write_atomically

HEADLINE = ("macro_f1", "micro_f1", "accuracy", "exact_match", "choice_accuracy", "choice_macro_f1", "loss", "perplexity")


def one_line(metrics: dict) -> str:
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in HEADLINE if k in metrics)


def final_table(before: dict, after: dict, step: int) -> str:
    """Step 0's evaluation beside the exported model's (`step`: the best evaluation's under
    checkpoint.export: best, not always the last: the column says which). With a decision cut
    tuned on validation (eval.tune_threshold), the exported figures are scored on the rows
    the cut was tuned on: their change from step 0 (at 0.5) would mix the training's gain with
    the tuning's, so it is left blank, and the @0.5 rows carry the change under one rule."""
    keys = [k for k in HEADLINE if k in after] + [f"{k}@0.5" for k in HEADLINE if f"{k}@0.5" in after]
    keys += sorted(k for k in after if k.startswith("f1/")) + sorted(k for k in after if k.startswith("choice_f1/"))
    ruled = {k for k in HEADLINE if f"{k}@0.5" in after}
    tuned = ruled | ({k for k in keys if k.startswith("f1/") and not k.endswith("@0.5")} if ruled else set())
    width = max(len(k) for k in keys) + 2
    c = max(10, len(f"step {step}") + 2)  # columns (step 100000 still has a space before it)
    lines = [f"{'metric':<{width}}{'step 0':>{c}}{f'step {step}':>{c}}{'change':>{c}}", "-" * (width + 3 * c)]
    for k in keys:
        a, b = after[k], before.get(k.removesuffix("@0.5"))
        if b is None:
            lines.append(f"{k:<{width}}{'-':>{c}}{a:>{c}.4f}{'':>{c}}")
        else:
            change = f"{'':>{c}}" if k in tuned else f"{a - b:>+{c}.4f}"
            lines.append(f"{k:<{width}}{b:>{c}.4f}{a:>{c}.4f}{change}")
    if ruled:
        lines.append(f"({', '.join(sorted(tuned))}: under the cut tuned on these validation rows, so no change is "
                     "given; @0.5: the 0.5 rule, as at step 0)")
    return "\n".join(lines)


def record_generations(run_dir: Path, step: int, rows: list[dict], tracker) -> None:
    """Append this eval's generations to RUN/generations.jsonl (entries from a step this
    late or later, left by an interrupted attempt, are replaced), rewrite the side-by-side
    table RUN/generations.md (one column per eval step), and send both to the tracker with
    the same rows as its `generations` table (MLflow's table view, a W&B Table per step)."""
    path = run_dir / "generations.jsonl"
    old = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    entries = [e for e in old if e["step"] < step] + [{"step": step, **r} for r in rows]
    write_atomically(path, "".join(json.dumps(e) + "\n" for e in entries))  # the earlier evaluations' too
    steps = sorted({e["step"] for e in entries})
    prompts = list(dict.fromkeys(e["prompt"] for e in entries))
    cell = {(e["step"], e["prompt"]): e["response"].replace("|", "\\|").replace("\n", " ") for e in entries}
    lines = ["| prompt | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for p in prompts:
        lines.append(f"| {p} | " + " | ".join(cell.get((s, p), "") for s in steps) + " |")
    write_atomically(run_dir / "generations.md", "\n".join(lines) + "\n")
    tracker.log_artifact(path)
    tracker.log_artifact(run_dir / "generations.md")
    tracker.log_table([{"step": e["step"], "prompt": e["prompt"], "response": e["response"]} for e in entries], "generations", step)


def record_predictions(run_dir: Path, step: int, rows: list[dict], answers: list[str] | None) -> None:
    """RUN/predictions/step-NNNNNN.jsonl: one line per answered validation row (question,
    reference, greedy response, and with a closed answer set the likeliest candidate)."""
    out = run_dir / "predictions"
    out.mkdir(exist_ok=True)
    lines = []
    for r in rows:
        record = {"index": r["index"], "question": r["question"], "reference": r["reference"], "response": r["response"]}
        if answers and "choice" in r:
            record["choice"] = answers[r["choice"]]
        lines.append(json.dumps(record) + "\n")
    write_atomically(out / f"step-{step:06d}.jsonl", "".join(lines))


def per_class_f1(final: dict) -> dict:
    """Each class's F1 under the exported rule: a tuned run's `f1/NAME@0.5` are the 0.5 rule's
    beside them, not classes."""
    return {k[3:]: v for k, v in final.items() if k.startswith("f1/") and not k.endswith("@0.5")}


def plot_run(metrics_jsonl: Path, final: dict, out: Path) -> Path | None:
    """Loss curves (train and eval) beside final per-class F1, as one PNG."""
    if not metrics_jsonl.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.tracking import read_metrics

    rows = read_metrics(metrics_jsonl)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    per_class = per_class_f1(final)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax1.plot(*zip(*evals), "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title("loss")
    names = list(per_class)
    ax2.barh(range(len(names)), [per_class[n] for n in names])
    ax2.set_yticks(range(len(names)), names, fontsize=8)
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("F1")
    ax2.set_title(f"final per-class F1 (macro {final.get('macro_f1', 0):.3f})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
