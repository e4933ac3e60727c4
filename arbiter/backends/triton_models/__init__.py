"""The Triton Python-backend model file (``model.py``, one for every kind),
copied by ``arbiter triton export`` into each version directory. It runs inside
Triton's Python stub (``triton_python_backend_utils`` exists only there):
never imported by Arbiter itself."""
