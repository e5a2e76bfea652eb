"""``python -m warpsocket``: the same as the ``warpsocket`` command."""

from .cli import main

if __name__ == "__main__":
    main()
