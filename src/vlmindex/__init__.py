"""vlmindex: compare the image features of vision-language models on lesion-classification data."""

__version__ = "0.1.0"
