"""Compile the reference MMDiT with specdiff and print speed-up and quality against plain Inductor.

    python examples/demo.py            # same as: specdiff-fx demo
"""

import sys

from specdiff_fx.demo import main

if __name__ == "__main__":
    sys.exit(main())
