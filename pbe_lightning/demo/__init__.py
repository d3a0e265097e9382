"""The demo: generated shards, tiny models of the real classes, and the generate-once cache.

Nothing in the production package imports it; the demo configs (``data=demo``,
``model/encoder=tiny``, ``model/backbone=tiny``) target it.
"""
