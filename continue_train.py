"""Resume training from a checkpoint, or fine-tune it with RL: see --help."""

from simple_nmt.cli import main_continue

if __name__ == "__main__":
    main_continue()
