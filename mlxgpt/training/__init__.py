"""Training: the one loop (pretraining and fine-tuning), its compiled step, loss, optimizer,
checkpoints, log and progress; LoRA adapters; ``mlxgpt pretrain``/``finetune``/``eval`` as library
calls."""
