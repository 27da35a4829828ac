"""Pretrain a self-supervised model from a YAML config; see ``--help``.

python scripts/pretrain.py --config simclr_lars.yaml
"""

import sys

from ssl_toolkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
