"""``python -m benchmarks``: the ``olmo2-bench`` command without its script."""
from .cli import main

raise SystemExit(main())
