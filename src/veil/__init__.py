"""veil: a runtime for confidential LLM inference.

PipeLLM (speculative pipelined encryption of every CPU-accelerator transfer) and CMIF (split inference
with a differentially-private sanitizer and an attested client-side embedding layer) in one package.
"""

__version__ = "0.1.0"
