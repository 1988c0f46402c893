"""`make bench`: run every benchmark module in this package, one after another."""

import importlib
import pkgutil
import sys

import benchmarks


def main() -> int:
    names = sorted(
        m.name
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name not in ("common", "__main__")
    )
    wanted = sys.argv[1:] or names
    for name in wanted:
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
