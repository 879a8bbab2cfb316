"""``avdigits``: placeholder, being written."""
