"""Run a module or script as this rank would, then record what it cost: one JSON line per
rank appended to $PROBE_OUT with the process's peak RSS (and that of its waited-for
children: tokenizing processes, DataLoader workers). Used by the benchmarks, not by launcher.

    accelerate launch ... benchmarks/_rank_probe.py -m launcher train CONFIG ...
    accelerate launch ... benchmarks/_rank_probe.py benchmarks/plain_datasets.py ...
"""

import json
import os
import resource
import runpy
import sys
import time

started = time.time()
args = sys.argv[1:]
code = 0
try:
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "wall_s": time.time() - started,
    }
    if os.environ.get("PROBE_OUT"):
        with open(os.environ["PROBE_OUT"], "a") as f:
            f.write(json.dumps(record) + "\n")
sys.exit(code)
