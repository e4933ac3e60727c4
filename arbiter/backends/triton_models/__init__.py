"""Triton Python-backend model files, one per model kind, copied by
``arbiter triton export`` into each version directory as ``model.py``.
They run inside Triton's Python stub (``triton_python_backend_utils`` exists
only there): never imported by Arbiter itself."""
