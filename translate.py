"""Translate stdin to stdout with a trained checkpoint: see --help."""

from simple_nmt.cli import main_translate

if __name__ == "__main__":
    main_translate()
