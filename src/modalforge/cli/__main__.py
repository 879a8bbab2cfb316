"""``python -m modalforge.cli``: the ``modalforge`` command."""

from modalforge.cli import main

if __name__ == "__main__":
    main()
