"""``python -m osteo ...`` is the ``osteo`` command; ``torchrun ... -m osteo train ...`` shares one run among processes."""
import sys

from .cli import main

sys.exit(main())
