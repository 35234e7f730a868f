"""launcher: one Accelerate training loop for transformer fine-tuning, from a laptop to a Slurm cluster."""

__version__ = "0.1.0"
