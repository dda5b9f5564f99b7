"""The embedded default: a tiny Llama built locally and synthetic hospitals with planted PII.

Operator and test tooling only: nothing here ships in the Flower app bundle (``fab-include``
carries ``common``, ``privacy``, ``client`` and ``server``), and no site or coordinator code imports it.
"""
