"""Measurement: held-out loss on fixed windows, generated samples and their top-k share p
(with pfreeze's own decode loop or transformers' generate), ‖ΔW‖ of tracked matrices,
confidence intervals. Each takes a model and fixed inputs and knows nothing of the run."""
