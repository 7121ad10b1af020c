"""The on-vehicle program: config, capture, the model pipeline, labelling, the frame loop,
publishing, metrics, lifecycle, reload and collection. Torch-free; imports
``retrofit_agent.contract`` and never ``retrofit_agent.train``.
"""
