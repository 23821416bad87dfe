"""Miniature pretraining pipeline: offline corpus, BPE tokenizer, packed batches."""
