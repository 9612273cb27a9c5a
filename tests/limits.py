"""Python run with a bounded address space, for the tests that a file is refused before it
is expanded (a YAML alias bomb, a zip bomb) or that running out of memory is reported: code
that allocates past the bound fails the test instead of exhausting the machine."""
from __future__ import annotations

import subprocess
import sys


def run_python(code: str, spare: int, timeout: float = 300, **kwargs
               ) -> subprocess.CompletedProcess:
    """``python -c code`` whose address space is bounded, before ``code`` runs, to what the
    interpreter has then plus ``spare`` bytes. Text output captured."""
    prelude = ("import resource\n"
               "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
               f"resource.setrlimit(resource.RLIMIT_AS, (size + {spare}, size + {spare}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def run_cli(argv: list[str], spare: int, **kwargs) -> subprocess.CompletedProcess:
    """``python -m cnn ARGV`` under :func:`run_python`'s bound."""
    return run_python(f"import runpy, sys\nsys.argv = ['cnn', *{list(map(str, argv))!r}]\n"
                      "runpy.run_module('cnn', run_name='__main__', alter_sys=True)\n",
                      spare, **kwargs)
