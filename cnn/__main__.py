import sys

from .cli import main
from .parallel.launch import run_main

# run_main: under mpiexec, a failure on any rank ends every rank instead of leaving them waiting
sys.exit(run_main(main))
