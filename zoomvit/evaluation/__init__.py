"""`zoomvit eval`: `runner.evaluate` over a labelled folder, with its tasks, data, work folder, figures and report."""
