"""``python -m mmrag_lite``: see ``mmrag_lite.cli``."""

from mmrag_lite.cli import main

raise SystemExit(main())
