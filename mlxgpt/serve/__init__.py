"""``mlxgpt serve``: an OpenAI-compatible HTTP server over continuous batched generation."""
