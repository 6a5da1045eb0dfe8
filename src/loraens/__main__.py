"""`python -m loraens ...`: the command line, also as torchrun's module (`torchrun -m loraens train ...`)."""

from .cli import main

raise SystemExit(main())
