"""``python -m trainer``: the same command as ``mstore train``."""

from .cli import main

if __name__ == "__main__":
    main()
