"""edgemri: distill a tiny brain-MRI classifier, personalize it with Flower, keep data on device."""

from edgemri.core.errors import version

__version__ = version()
