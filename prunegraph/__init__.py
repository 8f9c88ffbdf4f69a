"""prunegraph: graph analytics for redundancy in trained neural networks.

This package holds only the ``prunegraph`` command line, the composition root that may use
``graphs``, ``service`` and ``clients`` together; the libraries themselves never import it.
"""

__version__ = "0.1.0"
