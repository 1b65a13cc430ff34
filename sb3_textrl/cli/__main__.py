"""``python -m sb3_textrl.cli``: the ``sb3-textrl`` command."""

import sys

from sb3_textrl.cli import main

sys.exit(main())
