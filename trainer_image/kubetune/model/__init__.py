"""Model side of training: load the base model and tokenizer, apply the fine-tuning method."""
