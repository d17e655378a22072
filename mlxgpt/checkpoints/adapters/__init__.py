"""Adapters on a model's weights (LoRA, DoRA): what loading a model with ``--adapter`` needs,
below the training code that makes them."""
