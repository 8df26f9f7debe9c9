"""`python -m bench ARGS`: the benchmark's command line (bench/driver.py)."""

from bench.driver import main
from pfreeze import PfreezeError

try:
    main()
except PfreezeError as e:  # e.g. --device cuda without a GPU: one line, no traceback
    raise SystemExit(f"error: {e.problem}") from None
