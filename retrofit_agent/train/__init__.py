"""Offboard model toolchain (needs the ``train`` extra: torch, timm, open_clip, onnx).

Nothing outside this subpackage imports torch; the daemon only consumes its output,
a model bundle.
"""
