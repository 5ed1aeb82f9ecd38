"""Model backends: one interface (:class:`shared.backends.base.ModelBackend`), several implementations."""
