"""SQL shipped with relinker (installed as ``relinker.sql``).

``ntt_base.sql`` creates the NTT base tables (``relinker migrate --base``);
``NNNN_*.sql`` are the numbered migrations ``relinker migrate`` applies once
each; ``views.sql`` is re-applied on every migrate.
"""
