import sys

from .cli import main

# main() is also the console script's entry (parallel-cnn): under mpiexec, a failure on any rank
# ends every rank instead of leaving them waiting, whichever way the command was started
sys.exit(main())
