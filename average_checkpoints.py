"""Average the weights of checkpoints of one run: see --help."""

from simple_nmt.cli import main_average

if __name__ == "__main__":
    main_average()
