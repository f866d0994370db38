"""
``python -m hammal``: the operator's tool (L{hammal.ops.cli}); the server is
``twistd -n hammal``.
"""

import sys

from hammal.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
