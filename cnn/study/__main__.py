"""``python -m cnn.study``: the study command (same as ``python -m cnn study``)."""
import sys

from .cli import main

sys.exit(main())
