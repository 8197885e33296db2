"""Start the ZoomViT Explorer web app: `python app.py [--model ...] [--port ...]` (as on a Hugging Face Space).

The same app and options as `zoomvit serve`; the code lives in the `zoomvit` package (`zoomvit.app.ui`).
"""

import sys

from zoomvit.app.ui import main

if __name__ == "__main__":
    sys.exit(main())
