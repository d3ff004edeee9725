"""pas — Precision at Scale (arXiv 2407.03463): domain-specific image datasets on demand.

The library is pure where it can be (arrays and manifests in, arrays and manifests out);
`stages/<stage>.py` wires it to DVC paths and params.
"""

__version__ = "0.1.0"
