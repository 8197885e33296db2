"""The web app (Gradio): `ui` lays the page out and wires it; the handlers and their state live beside it.

`zoomvit serve` and the repository's `app.py` both call `zoomvit.app.ui.main`. Nothing is imported here, so that
the CLI can use the light modules (`serving`, `model_registry`) without loading Gradio.
"""
