"""The before/after table of the LLM clause recipe (configs/train/tos_llm_lora.yaml), on validation.

Reads a finished run directory: its per-row answers at step 0 (the untuned model, same prompt)
and at the exported step (RUN/predictions/step-N.jsonl), and scores them two ways, with the
launcher's own metric code:
- as the run does, over the nine answers (eight unfair-term categories and "Other"): greedy
  exact match, and macro-F1 of the likeliest answer (the export's `launcher predict` label);
- as the binary task the clause classifiers solve (fair = "Other", unfair = any category), so
  the LLM sits in one table with TF-IDF + SVM (computed here) and the MiniLM classifier.

    python benchmarks/tos_llm_table.py runs/tos_llm_lora

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAIR = "Other"


def rows_at(run: Path, step: int) -> list[dict]:
    return [json.loads(x) for x in (run / "predictions" / f"step-{step:06d}.jsonl").read_text().splitlines()]


def binary(rows: list[dict], key: str) -> dict:
    """Macro-F1 and unfair-class F1 of fair/unfair read off an answer: "Other" is fair, a category
    is unfair; a greedy answer that is neither counts as the opposite of the truth."""
    from launcher.tasks.generation import class_f1, normalize

    truth = ["fair" if r["reference"] == FAIR else "unfair" for r in rows]
    pred = []
    for r, t in zip(rows, truth):
        said = normalize(r.get(key) or "")
        if said == normalize(FAIR):
            pred.append("fair")
        elif key == "choice" or any(said == normalize(c) for c in CATEGORIES):
            pred.append("unfair")
        else:
            pred.append("unfair" if t == "fair" else "fair")
    f1 = class_f1(truth, pred, ["fair", "unfair"])
    return {"macro_f1": sum(f1.values()) / len(f1), "f1_unfair": f1.get("unfair", 0.0)}


CATEGORIES = ["Limitation of liability", "Unilateral termination", "Unilateral change", "Content removal",
              "Contract by using", "Choice of law", "Jurisdiction", "Arbitration"]


def tfidf() -> dict | None:
    proc = subprocess.run([sys.executable, str(HERE / "tfidf_svm.py")], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()
    run = args.run_dir
    final = json.loads((run / "final_metrics.json").read_text())
    before, after = rows_at(run, 0), rows_at(run, final["exported_step"])
    out = {"n": len(after), "exported_step": final["exported_step"]}
    for name, rows, metrics in (("before", before, final["before"]), ("after", after, final["after"])):
        out[name] = {"exact_match": metrics["exact_match"], "choice_macro_f1_9way": metrics["choice_macro_f1"],
                     "greedy_macro_f1_9way": metrics["macro_f1"],
                     "binary_choice": binary(rows, "choice"), "binary_greedy": binary(rows, "response")}
    svm = tfidf()
    lines = [f"UNFAIR-ToS validation ({len(after)} clauses), {run}",
             "",
             "| model | binary macro-F1 | unfair F1 | 9-way macro-F1 (likeliest answer) | greedy exact match |",
             "|---|---|---|---|---|"]
    for name, label in (("before", "SmolLM2-135M-Instruct, untuned (step 0), same prompt"),
                        ("after", f"`tos_llm_lora.yaml` (LoRA), exported step {final['exported_step']}")):
        m = out[name]
        lines.append(f"| {label} | {m['binary_choice']['macro_f1']:.3f} | {m['binary_choice']['f1_unfair']:.3f} | "
                     f"{m['choice_macro_f1_9way']:.3f} | {m['exact_match']:.3f} |")
    if svm is not None:
        out["tfidf_svm"] = svm
        lines.append(f"| TF-IDF + LinearSVC (`benchmarks/tfidf_svm.py`) | {svm['validation']['macro_f1']:.3f} | "
                     f"{svm['validation'].get('f1/unfair', float('nan')):.3f} | - | - |")
    lines.append("| MiniLM-L6 classifier, `clause_tos_minilm.yaml` (README, `make tos`) | 0.858 | - | - | - |")
    print("\n".join(lines))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
