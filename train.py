"""Train an NMT model (MLE, then optionally RL): see --help."""

from simple_nmt.cli import main_train

if __name__ == "__main__":
    main_train()
