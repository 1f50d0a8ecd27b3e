"""The detector bundle format and the one preprocessing function shared by trainer, exporter and daemon.

Never imports torch: this package runs on the edge device (Python 3.10+).
"""

__version__ = "0.1.0"
