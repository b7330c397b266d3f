"""`python -m ntksap ...`: the same as the `ntksap` command (see `ntksap.cli`).

Example:
    $ python -m ntksap list
"""

from ntksap.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
