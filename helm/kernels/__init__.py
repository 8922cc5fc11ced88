"""HELM's Triton kernels (CUDA): ``path_loss`` (the HXE loss family) and ``fftconv`` (Hyena's long
convolution), each with the signature of its PyTorch reference in ``helm.ops``; ``bench/`` holds
their microbenchmarks.

The package lives under ``helm`` (as ``mamba_ssm.ops.triton`` and ``liger_kernel.ops`` do) and
never at the top level: the import name ``kernels`` belongs to Hugging Face's kernel hub, which
``transformers`` depends on. Importing this package imports nothing; each module imports torch and
triton only, never the rest of helm.
"""
