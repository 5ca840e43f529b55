"""``python -m lut_compiler.bench [bench options]``: the same as ``lutc bench``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
