import sys

from mlbench_daemon.cli import main

sys.exit(main())
