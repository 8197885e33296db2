"""`zoomvit train`: `trainer.train` over Hugging Face's Trainer, with its data, models, outputs and options."""
