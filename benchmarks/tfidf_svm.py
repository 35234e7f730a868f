"""The linear baseline a clause classifier must beat: TF-IDF (1-2-grams) + LinearSVC.

The LexGLUE paper's strongest non-neural baseline, with balanced class weights. It
trains on --train and reports binary macro-F1 / micro-F1 on --validation (and on
--test when given), with the same metric code `launcher train` uses, so the two
numbers sit side by side in the README's results table.

    python benchmarks/tfidf_svm.py                        # shared UNFAIR-ToS clauses
    python benchmarks/tfidf_svm.py --train a.jsonl --validation b.jsonl --test c.jsonl

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "unfair_tos"


def read(path: Path) -> tuple[list[str], np.ndarray]:
    from _contenders import read_clauses  # the benchmarks' one JSONL text/label reader

    texts, labels = read_clauses(str(path))
    return texts, np.asarray(labels)


def scores(pred: np.ndarray, gold: np.ndarray) -> dict:
    # Same metric code as the training loop: one-hot "logits" give argmax == pred.
    from launcher.tasks.classification import compute_metrics

    logits = torch.nn.functional.one_hot(torch.as_tensor(pred), 2).float()
    m = compute_metrics(logits, torch.as_tensor(gold), ["fair", "unfair"])
    return {k: round(m[k], 4) for k in ("macro_f1", "micro_f1", "f1/unfair")}


def main(argv=None) -> int:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, default=SHARED / "train.jsonl")
    p.add_argument("--validation", type=Path, default=SHARED / "validation.jsonl")
    p.add_argument("--test", type=Path, default=None, help="scored too when given (never tune on it)")
    p.add_argument("--C", type=float, default=1.0, help="LinearSVC regularisation (sklearn default)")
    args = p.parse_args(argv)
    for f in (args.train, args.validation, args.test):
        if f is not None and not f.is_file():
            print(f"{f}: no such file", file=sys.stderr)
            return 2

    x_train, y_train = read(args.train)
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2)),
        LinearSVC(C=args.C, class_weight="balanced"),
    )
    model.fit(x_train, y_train)
    result: dict = {"baseline": "tfidf-1-2gram+linear-svc(balanced)", "train_rows": len(y_train)}
    for name, path in (("validation", args.validation), ("test", args.test)):
        if path is None:
            continue
        x, y = read(path)
        result[name] = scores(model.predict(x), y)
        print(f"{name:<10} {len(y):>5} clauses  macro-F1 {result[name]['macro_f1']:.4f}  micro-F1 {result[name]['micro_f1']:.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
