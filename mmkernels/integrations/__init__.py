"""Integrations of mmkernels into other libraries' models (``mmkernels.integrations.hf``: Hugging Face
transformers)."""
