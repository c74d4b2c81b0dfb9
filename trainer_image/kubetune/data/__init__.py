"""Data pipeline: read -> convert to messages -> tokenize with the chat template (once per job,
cached) -> rows, packed or not -> each rank's batches.

    loader.py, converters.py   files -> examples (message lists), errors naming file and line
    tokenize.py, encoding.py   messages -> token ids and labels with the model's chat template
    cache.py                   the tokenized data kept beside the checkpoints and on each node
    batching.py                packing (best-fit decreasing), data order, the collator
    pipeline.py                prepare(): the above composed for a run
"""
