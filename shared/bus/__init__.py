"""The message bus: one interface (:mod:`shared.bus.base`), an in-process and a Redis Streams implementation."""
