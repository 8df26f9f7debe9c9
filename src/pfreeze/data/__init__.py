"""Data: reading a corpus (a file or a Project Gutenberg book), stripping boilerplate,
tokenising, counting tokens (the top-k set behind p), and the seeded batch stream every arm
shares. Beside models at the bottom of the layers."""
