import os
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still being imported: nothing has started yet
    print("interrupted: nothing was written", file=sys.stderr)
    sys.exit(130)

code = main()
if code == 130:
    # Interrupted, and the temporary output is already removed: leave at once instead of waiting for
    # worker threads to finish the tensor they hold (the interpreter's shutdown can abort on those).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
