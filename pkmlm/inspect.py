"""`python -m pkmlm.inspect`: what memory slots are read for (the command line of pkmlm.eval.inspect)."""

import sys

from pkmlm.eval.inspect import main

if __name__ == "__main__":
    sys.exit(main())
