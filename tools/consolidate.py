"""Consolidate a sharded (FSDP2) run: the newest out_dir/step_N/ folder written as out_dir/ckpt.pt, a single file that
sample.py, chat.py, the evaluations and the other tools load.

    python tools/consolidate.py OUT_DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from nanogpt.checkpoint import consolidate_newest  # noqa: E402


def main(argv):
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit("usage: python tools/consolidate.py OUT_DIR   (newest OUT_DIR/step_*/ -> OUT_DIR/ckpt.pt)")
    out_dir = argv[0]
    print(f"consolidated {consolidate_newest(out_dir)} -> {os.path.join(out_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    main(sys.argv[1:])
