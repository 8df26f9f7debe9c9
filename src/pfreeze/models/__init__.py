"""Models: loading any supported causal LM (the embedded SmolLM2, a hub id or folder, tiny
random-init shapes) as a plain transformers model, and the family registry that says how each
family names and lays out its weights (roles, blocks, heads, fused Q/K/V). The lowest layer:
it imports nothing else of pfreeze but the foundations (errors, atomic, settings)."""
