"""retrofit-agent: real-time zero-shot image labelling on in-car edge cameras.

The package root stays torch-free and does no work at import time; the training
toolchain lives in :mod:`retrofit_agent.train` behind the ``train`` extra.
"""

__version__ = "0.1.0"
