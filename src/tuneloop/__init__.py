"""tuneloop: keep a fine-tuned LLM current, one gated pipeline run at a time."""

__version__ = "0.1.0"
