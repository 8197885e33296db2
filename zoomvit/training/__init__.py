"""`zoomvit train`: `trainer.train` over Hugging Face's Trainer, with its data, models and outputs (its command-line
options are `zoomvit.cli.train`)."""
