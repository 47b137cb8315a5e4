"""The dataset: JSONL chats and instructions -> token ids and an assistant-only loss mask
(:mod:`~distill.data.dataset`). No torch; the tokenizer is passed in."""
