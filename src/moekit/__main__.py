"""``python -m moekit``: the ``moekit`` command."""

import sys

from moekit.cli.main import main

sys.exit(main())
