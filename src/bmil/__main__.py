"""``python -m bmil``: the ``bmil`` command."""

import sys

from bmil.cli import main

sys.exit(main())
