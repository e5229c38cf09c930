import sys

from fedfms_secure.cli import main

sys.exit(main())
