from setuptools import find_packages, setup

setup(
    name="simple-nmt",
    version="0.1.0",
    description="Neural machine translation (LSTM seq2seq, Transformer) with reinforcement-learning fine-tuning",
    packages=find_packages(include=["simple_nmt", "simple_nmt.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6.0,<3",
        "pytorch-ignite>=0.5.0.post2,<0.6",
        "sacrebleu>=2.3.0,<3",
        "numpy>=1.24.4",
        "tqdm>=4.60.0",
        "sentencepiece>=0.1.99",
    ],
    extras_require={
        "tensorboard": ["tensorboard>=2.10"],
        "hf": ["transformers>=5.24,<6"],
        "mbr": ["fastchrf>=0.2.1"],
        "ct2": ["ctranslate2>=4.8.5,<5"],
        "test": ["pytest>=7", "nltk>=3.8", "hypothesis>=6", "ruff>=0.5", "fastchrf>=0.2.1", "ctranslate2>=4.8.5,<5"],
    },
)
