"""The model core: GPT-2 hyper-parameters, the architecture, the backend's choices."""
