"""The weight plane of the distributed setup: how a published version reaches every serving process.

- :mod:`services.control.listener`: :class:`WeightControlListener`, which a serving process (the
  organizer; ``services/organizer/__main__.py`` starts one) runs beside its work: it loads the newest
  published version when it starts, then every new one, and answers each.
- :mod:`services.control.publisher`: :class:`FleetPublisher`, the trainer's way to the fleet: SGLang
  servers (pause, update from disk, continue), Celery model workers (a remote-control broadcast, see
  ``services/workers/control.py``), organizers (the control stream) and backends in this process.

The messages are in :mod:`shared.control`.
"""
