"""pfreeze's benchmark, outside the package: `python -m bench ARGS` from the repository root.

    driver    the training rows and the command line (`python -m bench --help`)
    sampling  the generation rows
    results   the JSON file, the printed table, the ratios, `--resume`
    flops     model FLOPs of a step (MFU's numerator)
    inductor  --inductor KEY=VALUE as torch._inductor.config settings
    common    what they share: the shapes, the arms, a one-arm pfreeze Loop

It imports pfreeze through the names `pfreeze/__init__.py` exports only (bench/tests checks).
The scripts beside them (profile_step, host_time, ...) run as `python -m bench.NAME ARGS`.
"""
