"""cir: composed image retrieval toolkit.

Importing the package is cheap on purpose: torch, open_clip and transformers are imported
inside the functions that need them, so `cir --help` and shell completion stay fast.
"""

__version__ = "0.1.0"
