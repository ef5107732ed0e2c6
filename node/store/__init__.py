"""What the node keeps on disk: durable files (files.py) and the SQLite databases."""
