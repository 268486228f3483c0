"""edgemri: distill a tiny brain-MRI classifier, personalize it with Flower, keep data on device."""

__version__ = "0.1.0"
