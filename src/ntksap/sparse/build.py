"""`python -m ntksap.sparse.build`: compile the C++ sparse kernels ahead of time.

Never fails (exit status 0) when the extension cannot be built, e.g. on a machine without
a C++ compiler: it says so, and `ntksap.sparse` then uses its pure-torch fallback. Pass
`--strict` to exit 1 instead.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntksap.sparse.build", description=__doc__)
    parser.add_argument("--strict", action="store_true", help="exit 1 if the build fails")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    from ntksap.sparse import _ext

    try:
        module = _ext.build(verbose=args.verbose)
    except Exception as exc:
        print(
            f"ntksap.sparse: C++ kernels not built ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the pure-torch fallback is used",
            file=sys.stderr,
        )
        return 1 if args.strict else 0
    avx = "AVX-512" if module.has_avx512() else "compiler-vectorised"
    print(f"ntksap.sparse: C++ kernels ready ({avx}) in {_ext.build_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
