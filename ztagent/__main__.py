import sys

from ztagent.cli import main

sys.exit(main())
