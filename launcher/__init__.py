"""launcher: one Accelerate training loop for transformer fine-tuning, from a laptop to a Slurm cluster."""

__version__ = "0.1.0"

import time as _time

STARTED = _time.time()  # process start, near enough: the time to the first step is reported from here
