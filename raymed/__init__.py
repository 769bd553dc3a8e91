"""raymed: parameter-efficient fine-tuning of medical vision-language models on Ray."""

__version__ = "0.1.0"
