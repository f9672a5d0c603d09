import sys

from tunesmith.cli.main import main

sys.exit(main())
