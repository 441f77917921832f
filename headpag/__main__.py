"""`python -m headpag ...` (also under `accelerate launch -m headpag` and `torchrun -m headpag`)."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
