"""Integrations of fusednorm with model libraries (transformers is imported by none of them).

- ``fusednorm.integrations.norms``: ``replace_norms`` (re-exported as ``fusednorm.replace_norms``) and
  ``HFRMSNorm``, the drop-in for Hugging Face's RMSNorm classes (LLaMA's and Gemma's ``(1 + w)``).
- ``fusednorm.integrations.huggingface``: ``fuse_model``: BERT-style Post-LN blocks and LLaMA-family decoder
  layers get the fused residual add + norm (``fusednorm.integrations.decoder``), every other norm is swapped.
- ``fusednorm.integrations.hub``: layers for the Hugging Face ``kernels`` hub convention (``kernelize``).
- ``fusednorm.integrations.report``: ``PatchReport``, what a patch function swapped, fused or left, and why.
"""
