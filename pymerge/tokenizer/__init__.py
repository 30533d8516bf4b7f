"""Tokenizer merges, as mergekit 0.1.5 makes them: `tokenizer_source` / `tokenizer:` (spec.py), the
output vocabulary and each model's permutation onto it (vocab.py), the embedding rows streamed in
blocks (rows.py), the tokenizer files written (output.py) and `chat_template` (templates.py).
Reads and writes tokenizer.json as JSON: no transformers, no tokenizers library."""
