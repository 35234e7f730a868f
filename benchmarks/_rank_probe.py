"""Run a module or script as this rank would, then record what it cost: one JSON line per
rank appended to $PROBE_OUT with the process's peak RSS (and that of its waited-for
children: tokenizing processes, DataLoader workers). Used by the benchmarks, not by launcher.

    accelerate launch ... benchmarks/_rank_probe.py -m launcher train CONFIG ...
    accelerate launch ... benchmarks/_rank_probe.py benchmarks/plain_datasets.py ...

The record is written by an atexit handler: `launcher` ends with os._exit after running the
atexit handlers (cli.run skips Python's slow teardown), so a `finally` here would never run.
"""

import atexit
import json
import os
import resource
import runpy
import sys
import time

started = time.time()


def _record() -> None:
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "wall_s": time.time() - started,
    }
    if os.environ.get("PROBE_OUT"):
        with open(os.environ["PROBE_OUT"], "a") as f:
            f.write(json.dumps(record) + "\n")


atexit.register(_record)
args = sys.argv[1:]
if args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
