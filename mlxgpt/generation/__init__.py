"""Generation: the KV cache, the context a model has read, sampling, streamed text with stop
strings, and chat sessions in the transcript format."""
