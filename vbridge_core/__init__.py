"""V-Bridge core: few-shot image restoration with the Wan2.2-TI2V-5B video diffusion transformer.

Importing this package is cheap: heavy modules (torch models, diffusers) load when first used.
Main entry points: :class:`vbridge_core.pipeline.VBridgePipeline` and ``python -m vbridge_core``.
"""
__version__ = "0.1.0"
