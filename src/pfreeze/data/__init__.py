"""Data: reading a corpus (a file, a folder, JSONL/CSV/Parquet rows, chats, a saved or hub
dataset, a Project Gutenberg book), stripping boilerplate, tokenising once (cached), counting
tokens (the top-k set behind p), and the seeded batch stream every arm shares. Beside models at
the bottom of the layers."""
