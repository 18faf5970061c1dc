"""``python -m olmo2.train`` (and ``torchrun -m olmo2.train``): the ``olmo2-train`` command."""
from ..cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
