"""``python -m imc_prune``: the ``imc-prune`` command line (:mod:`imc_prune.cli`)."""

import sys

from imc_prune.cli import main

sys.exit(main())
