"""Moved to `pipeline.capture` (pruning's recovery reads the same internals); kept so imports from here work."""
from pipeline.capture import Internals, ScoreCapture, run_with_internals, self_attention_modules  # noqa: F401
