"""Training data: text corpora as token files (pretraining), JSONL examples as masked batches
(fine-tuning and evaluation)."""
