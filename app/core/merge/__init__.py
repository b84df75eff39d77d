"""The merge pipeline: output architectures, gate computation, the native decoder, the shard writer and the model card.

Import the submodules themselves (``app.core.merge.pipeline`` and so on): this package imports nothing, so
that a module needing only one stage does not pull in the others.
"""
