"""Fixed start-up cost: what a run imports before its first optimizer step."""

from __future__ import annotations

import subprocess
import sys

from conftest import TINY


def test_a_run_without_deepspeed_never_imports_it(tmp_path):
    """accelerate's unwrap_model imports deepspeed whenever it is installed (about a second
    of start-up); a single-process run goes through its first steps and a checkpoint
    without it (the export at the end still pays it inside transformers' save_pretrained)."""
    code = ("import sys; from launcher.cli import main; "
            f"rc = main(['train', {str(TINY)!r}, '--output-dir', {str(tmp_path)!r}, '--run-name', 'r', "
            "'train.max_steps=4', 'train.halt_at_step=2', 'eval.at_start=false']); "
            "print(rc, 'deepspeed' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 False True"
    assert (tmp_path / "r" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
