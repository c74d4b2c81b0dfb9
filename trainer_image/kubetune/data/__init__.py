"""Data pipeline: read -> convert to messages -> tokenize with the chat template -> rows -> batches."""
