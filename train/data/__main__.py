"""`python -m train.data` (also `accelerate launch -m train.data`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
