"""``python -m cxr_platform.cli``: how the platform launches `cxr` in a child process."""

from cxr_platform.cli import main

main()
