"""pfreeze: targeted fine-tuning with precision freezing, measured against full fine-tuning."""

from pfreeze.errors import PfreezeError

__version__ = "0.1.0"
__all__ = ["PfreezeError", "__version__"]
