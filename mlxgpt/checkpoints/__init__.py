"""Model folders on disk: mlxgpt's own format, Hugging Face GPT-2 folders and hub ids, conversion,
quantization, atomic writes; :func:`load` is the one way in."""
