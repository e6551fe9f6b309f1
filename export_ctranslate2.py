"""Export a checkpoint (or a Hugging Face model folder) to a CTranslate2 model folder: see --help."""

from simple_nmt.cli import main_export

if __name__ == "__main__":
    main_export()
