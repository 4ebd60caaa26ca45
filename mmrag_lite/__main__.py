"""``python -m mmrag_lite``: see ``mmrag_lite.cli``."""

from mmrag_lite.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    raise SystemExit(main())
