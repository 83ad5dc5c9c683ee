"""``python -m moekit.experiments.quant RUN``: the quality of int8/int4 experts, as JSON."""

import sys

from moekit.experiments.quant import main

sys.exit(main())
