"""The lab: data, augmentation, training and the real-ViT experiments, built on the attention library.

It sits above :mod:`dropkey` (the attention library, which never imports it) and below
:mod:`reports` (docs/architecture.md). Modules are imported by name (``dropkey.lab.train``,
``dropkey.lab.data``, ``dropkey.lab.experiments``); this package imports nothing itself.
"""
