"""Consolidate a sharded (FSDP2) run: the newest out_dir/step_N/ folder written as out_dir/ckpt.pt, a single file that
sample.py, chat.py, the evaluations and the other tools load.

    python tools/consolidate.py OUT_DIR
"""
import logging
import os
import sys

from torch.distributed.checkpoint.api import CheckpointException

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from nanogpt.checkpoint import consolidate_newest, step_dirs  # noqa: E402


def main(argv):
    usage = "usage: python tools/consolidate.py OUT_DIR   (newest OUT_DIR/step_*/ -> OUT_DIR/ckpt.pt)"
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\n" + usage)
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit(usage)
    out_dir = argv[0]
    logging.disable(logging.WARNING)  # DCP logs every failed read with its traceback to the root logger
    try:
        newest = consolidate_newest(out_dir)
    except CheckpointException:
        sys.exit(f"consolidate: {step_dirs(out_dir)[-1]} is not a readable sharded checkpoint (damaged or incomplete)")
    except Exception as e:  # no step_N/, a damaged meta.pt, an unwritable OUT_DIR
        sys.exit(f"consolidate: {out_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    print(f"consolidated {newest} -> {os.path.join(out_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    main(sys.argv[1:])
