"""What the daemon and the toolchain share and agree on: the bundle manifest and text bank,
bundle verification and signatures, preprocessing, the ONNX embedder, the prompts file, the
message models, settings I/O and image discovery.

Torch-free, and imports neither ``retrofit_agent.daemon`` nor ``retrofit_agent.train``.
"""
