"""The small files a run writes whole (launcher/files.py): a write that fails midway leaves
the file as it was. A file-size limit (RLIMIT_FSIZE, EFBIG) fails a write at a byte count
the test chooses, as a full disk fails it with ENOSPC, without root or a small mount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LIMITED = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
{body}
"""


def _limited(limit: int, body: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED.format(body=body), str(limit), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_generations_of_earlier_evaluations_survive_a_write_that_fails_midway(tmp_path):
    """RUN/generations.jsonl holds every evaluation's answers and is rewritten at each one; it
    was truncated first (write_text), so a write that failed (a full disk) lost all of them."""
    from launcher import report

    class Kept:  # the tracker's side is tested in test_tracking.py; here only the file matters
        def log_artifact(self, path, artifact_path=None): pass

        def log_table(self, rows, name, step): pass

    for step in (0, 2):
        report.record_generations(tmp_path, step, [{"prompt": "p", "response": f"r{step}"}], Kept())
    before = (tmp_path / "generations.jsonl").read_text()
    proc = _limited(len(before) + 200, """
from launcher import report
class Kept:
    def log_artifact(self, path, artifact_path=None): pass
    def log_table(self, rows, name, step): pass
try:
    report.record_generations(Path(sys.argv[2]), 4, [{"prompt": "p", "response": "x" * 5000}], Kept())
except OSError as e:
    print(e.errno)
""", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "27", proc.stderr[-2000:]  # EFBIG: the write failed
    assert (tmp_path / "generations.jsonl").read_text() == before
    assert [json.loads(x)["step"] for x in before.splitlines()] == [0, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.jsonl", "generations.md"]  # no temporary left


def test_a_file_written_whole_takes_the_umask_s_mode_or_the_one_given(tmp_path):
    """As write_text's file would (the temporary's own mode is 0600), or `mode` (a shared cache's lock)."""
    from launcher.files import write_atomically

    old = os.umask(0o002)
    try:
        write_atomically(tmp_path / "a.json", "{}")
        write_atomically(tmp_path / "lock", "{}", 0o664)
        os.umask(0o077)
        write_atomically(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o664, "lock": 0o664, "b.json": 0o600}
    assert (tmp_path / "a.json").read_text() == "{}"


def test_a_file_rewritten_whole_keeps_its_mode_and_a_link_stays_a_link(tmp_path):
    """As write_text: a file's own mode stays (a run directory shared on purpose), and a link's
    file is the one replaced."""
    from launcher.files import write_atomically

    (tmp_path / "config.yaml").write_text("a: 1\n")
    os.chmod(tmp_path / "config.yaml", 0o640)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "job.json").write_text("{}")
    (tmp_path / "job.json").symlink_to(tmp_path / "elsewhere" / "job.json")
    write_atomically(tmp_path / "config.yaml", "a: 2\n")
    write_atomically(tmp_path / "job.json", '{"slurm_job_id": "7"}')
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n" and (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "job.json").is_symlink() and (tmp_path / "elsewhere" / "job.json").read_text() == '{"slurm_job_id": "7"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "elsewhere", "job.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "job.json").write_text('{"slurm_job_id": "1"}')
    proc = _limited(1000, """
from launcher.files import write_atomically
try:
    write_atomically(Path(sys.argv[2]) / "job.json", "x" * 5000)
except OSError as e:
    print(e.errno)
""", str(tmp_path))
    assert proc.stdout.strip() == "27", proc.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]
    assert (tmp_path / "job.json").read_text() == '{"slurm_job_id": "1"}'


def test_rank_0_s_failure_note_still_appears_when_its_text_cannot_be_written(tmp_path):
    """Rank 0 writes a note when its write (an export, a snapshot) fails, and the waiting ranks
    stop on seeing it. On a full disk the note's text cannot be written; an empty note, which
    needs no room, still stops them at once (else they wait until the launch kills them)."""
    proc = _limited(64, """
from types import SimpleNamespace
from launcher.checkpoint import main_writes_others_wait
rt = SimpleNamespace(world_size=2, is_main=True, shared_token=lambda: "t")
def write():
    raise OSError(28, "No space left on device: " + "x" * 200)
try:
    main_writes_others_wait(rt, write, Path(sys.argv[2]), "the model")
except OSError as e:
    print(e.errno)
""", str(tmp_path))
    assert proc.stdout.strip() == "28", proc.stderr[-2000:]  # rank 0's own error is the one raised
    assert [p.name for p in tmp_path.iterdir()] == [".failed-t"]
