"""`python -m zoomvit ...` runs the `zoomvit` command (torchrun too: `torchrun ... -m zoomvit train ...`)."""

import sys

from zoomvit.cli import main

if __name__ == "__main__":
    sys.exit(main())
