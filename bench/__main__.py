"""``python -m bench PART ...`` from the repository root: the same as ``elbert-stream bench PART ...``."""

import sys

from elbert_stream.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
