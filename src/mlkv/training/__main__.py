"""``python -m mlkv.training`` (and ``torchrun ... -m mlkv.training``): the ``mlkv train`` command."""

import sys

from mlkv.training.command import main

sys.exit(main())
