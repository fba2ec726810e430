"""``python -m flame.node``: a runner, configured by FLAME_* environment variables."""
from .node import main

main()
