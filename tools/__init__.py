"""Occasional tools, each run as `python tools/NAME.py ...` from the repo root: Hugging Face export, merging,
comparing runs, the lm-evaluation-harness adapter, consolidating a sharded checkpoint."""
