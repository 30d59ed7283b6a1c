"""Serving a trained model: the batching engine, the OpenAI-compatible app and its chat page."""
