"""``python -m ppvi``: the ``ppvi`` command (:mod:`ppvi.cli`)."""

import sys

from ppvi.cli import main

if __name__ == "__main__":
    sys.exit(main())
