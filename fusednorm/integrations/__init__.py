"""Integrations of fusednorm with model libraries (optional dependencies, imported on demand).

- ``fusednorm.integrations.huggingface``: fuse the Post-LN blocks of BERT-style Hugging Face models and
  swap their norms (including LLaMA-family RMSNorm classes) for fusednorm's.
"""
