"""The run: the runtime (device, precision, compilation, attention kernel, sampler, resolved
once), one optimizer step, the loop that builds and steps every arm on one batch stream, the
arms themselves (one module per kind), the frozen-prefix cache, the measurement moments, and
the session that runs the phases, checkpoints, interrupts and outputs of a whole run.

Called, `pfreeze.run(config, **overrides)` runs an experiment and returns its results
(pfreeze.api.run)."""
