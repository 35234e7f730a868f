"""Does a tuned decision threshold earn its place? Cross-fitted evidence on labelled clauses.

It scores an exported classifier (`RUN/model`) once on a labelled JSONL file, splits the
rows into K contiguous folds (UNFAIR-ToS files keep one document's clauses together, so
contiguous folds approximate held-out documents), tunes the cut on K-1 folds with the
same rule `eval.tune_threshold` uses (launcher.tasks.classification.tune_cuts), and scores
the held-out fold with that cut and with 0.5. The figures that matter are the held-out
ones: a cut that only fits the rows it was tuned on shows up as a loss here.

    python benchmarks/threshold_folds.py RUN/model ../shared/data/unfair_tos/validation.jsonl --folds 5

The last line printed is one JSON object (per-fold and pooled macro-F1, both rules).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    from launcher.data.clauses import LabelEncoder, parse_rows, read_records
    from launcher.tasks import classification as clf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("data", type=Path, help="labelled JSONL (validation clauses; never the test split)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--max-length", type=int, default=512)
    args = p.parse_args(argv)
    if not args.data.is_file():
        print(f"{args.data}: no such file", file=sys.stderr)
        return 2

    model, tokenizer, names, multilabel, _ = clf.load_exported(args.model_dir)
    texts, targets = parse_rows(read_records(args.data), LabelEncoder("multilabel" if multilabel else "binary", names), str(args.data))
    logits = clf.batched_logits(model, tokenizer, texts, args.max_length)
    labels = torch.tensor(targets, dtype=torch.float if multilabel else torch.long)
    folds = np.array_split(np.arange(len(texts)), args.folds)

    rows, pooled_tuned, pooled_plain = [], [], []
    for k, held in enumerate(folds):
        fit = np.concatenate([f for j, f in enumerate(folds) if j != k])
        threshold = clf.tune_cuts(logits[fit], labels[fit], names)
        cuts = clf.cut_vector(threshold, names, multilabel)
        tuned = clf.compute_metrics(logits[held], labels[held], names, cuts)["macro_f1"]
        plain = clf.compute_metrics(logits[held], labels[held], names)["macro_f1"]
        pooled_tuned.append(clf.decisions(logits[held], multilabel, cuts))
        pooled_plain.append(clf.decisions(logits[held], multilabel))
        rows.append({"fold": k, "rows": len(held), "threshold": threshold, "macro_f1": round(tuned, 4), "macro_f1@0.5": round(plain, 4)})
        print(f"fold {k}: {len(held):>4} rows  cut {threshold}  held-out macro-F1 tuned {tuned:.4f}  at 0.5 {plain:.4f}")

    def pooled(preds):
        pred = np.concatenate(preds)
        onehot = torch.as_tensor(pred, dtype=torch.float) if multilabel else torch.nn.functional.one_hot(torch.as_tensor(pred), len(names)).float()
        # Decisions as logits: a huge margin reproduces them under the 0.5 rule.
        return clf.compute_metrics((onehot * 2 - 1) * 20, labels[np.concatenate(folds)], names)["macro_f1"]

    result = {"model": str(args.model_dir), "data": str(args.data), "folds": rows,
              "pooled_macro_f1": round(pooled(pooled_tuned), 4), "pooled_macro_f1@0.5": round(pooled(pooled_plain), 4)}
    print(f"pooled held-out macro-F1: tuned {result['pooled_macro_f1']:.4f}  at 0.5 {result['pooled_macro_f1@0.5']:.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
