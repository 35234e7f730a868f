"""Synthetic Terms-of-Service clauses with a learnable signal, for tests and the demo.

Each unfair clause is built from phrasings typical of one UNFAIR-ToS category;
fair clauses reuse the same vocabulary ("terms", "laws", "account", "content",
"dispute") in harmless roles, so a model has to learn which combinations matter
rather than spot a single word. Labels are category ids in UNFAIR-ToS order
(empty list = fair), the same shape as LexGLUE's `labels` column.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SUBJECTS = ["We", "The Company", "The provider", "Acme", "The service operator", "Our team"]
_PLACES = ["the State of California", "England and Wales", "Ireland", "the Netherlands", "New York", "Luxembourg"]
_THINGS = ["your use of the service", "any content", "service interruptions", "third-party links", "data loss"]

_UNFAIR = {
    0: [  # Limitation of liability
        "{S} shall not be liable for any damages arising from {T}.",
        "In no event will {S} be responsible for losses caused by {T}.",
        "{S} disclaims all liability for {T} to the maximum extent permitted.",
    ],
    1: [  # Unilateral termination
        "{S} may terminate your account at any time without notice.",
        "{S} can suspend or end access to the service for any reason at its sole discretion.",
        "Your account may be closed by {S} at any time and without giving reasons.",
    ],
    2: [  # Unilateral change
        "{S} reserves the right to change these terms at any time without prior notice.",
        "{S} may modify the service and these terms whenever it wishes.",
        "These terms may be amended by {S} unilaterally and the changes apply immediately.",
    ],
    3: [  # Content removal
        "{S} may remove any content you post at its sole discretion.",
        "{S} can delete your uploads without notice for any reason.",
        "Any material may be taken down by {S} without explanation.",
    ],
    4: [  # Contract by using
        "By using the service you agree to be bound by these terms.",
        "Your continued use of the website means you accept these terms.",
        "Accessing the app constitutes acceptance of this agreement.",
    ],
    5: [  # Choice of law
        "These terms are governed by the laws of {P}.",
        "This agreement shall be construed in accordance with the law of {P}.",
        "The laws of {P} apply to any claim under these terms.",
    ],
    6: [  # Jurisdiction
        "Any dispute shall be brought exclusively in the courts of {P}.",
        "You consent to the exclusive jurisdiction of the courts located in {P}.",
        "All claims must be filed before a tribunal in {P} only.",
    ],
    7: [  # Arbitration
        "All disputes will be resolved by binding arbitration rather than in court.",
        "You waive your right to a jury trial and agree to individual arbitration.",
        "Any claim shall be settled by an arbitrator whose decision is final.",
    ],
}

_FAIR = [
    "{S} will notify you by email before any change to these terms takes effect.",
    "You can close your account at any time from the settings page.",
    "{S} processes personal data in line with applicable data protection laws.",
    "You keep ownership of the content you upload to the service.",
    "If you have a dispute, please contact our support team first.",
    "These terms describe how {S} provides the service to you.",
    "You may export your data in a common format whenever you like.",
    "{S} will explain the reason before removing any content you posted.",
    "Nothing in these terms limits rights you have under consumer law in {P}.",
    "The service is available in several languages, including English.",
    "You must be at least 16 years old to create an account.",
    "Fees are shown in your local currency before you pay.",
]


def generate_clauses(n: int, seed: int = 0, unfair_rate: float = 0.4, noise: float = 0.03) -> list[dict]:
    """n rows of {"text": str, "labels": [category ids]}; about unfair_rate of them unfair.

    A `noise` fraction of rows get a random label set, as annotators sometimes err:
    scores stay below a perfect 1.0, and a model that memorises the noise loses on
    validation.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < noise:
            text = rng.choice(_FAIR + [t for ts in _UNFAIR.values() for t in ts])
            fill = {"S": rng.choice(_SUBJECTS), "P": rng.choice(_PLACES), "T": rng.choice(_THINGS)}
            rows.append({"text": text.format(**fill), "labels": [] if rng.random() < 0.5 else [rng.randrange(8)]})
            continue
        fill = {"S": rng.choice(_SUBJECTS), "P": rng.choice(_PLACES), "T": rng.choice(_THINGS)}
        if rng.random() < unfair_rate:
            cats = [rng.randrange(8)]
            if rng.random() < 0.15:  # some clauses are unfair in two ways
                cats.append(rng.choice([c for c in range(8) if c != cats[0]]))
            text = " ".join(rng.choice(_UNFAIR[c]).format(**fill) for c in cats)
            rows.append({"text": text, "labels": sorted(cats)})
        else:
            rows.append({"text": rng.choice(_FAIR).format(**fill), "labels": []})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def write_splits(out_dir: str | Path, n_train: int, n_validation: int, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and validation.jsonl from disjoint random streams."""
    out_dir = Path(out_dir)
    train = write_jsonl(generate_clauses(n_train, seed), out_dir / "train.jsonl")
    val = write_jsonl(generate_clauses(n_validation, seed + 1_000_003), out_dir / "validation.jsonl")
    return train, val
