"""Data: the built-in corpus, sentencepiece tokenizers, and the grain pipeline."""
