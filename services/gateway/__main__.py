"""Run the gateway: ``python -m services.gateway [--host H] [--port P] [--log-level L]``.

Reads ``Settings`` (``ASYNCTHINK_*``, ``DATABASE_URL``, ``REDIS_URL``); ``ASYNCTHINK_BUS=redis`` selects the
distributed setup, the default runs an organizer in the same process (see :mod:`services.gateway.app`).
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m services.gateway", description="Run the AsyncThink REST gateway (uvicorn)."
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn
    from pydantic import ValidationError

    from services.gateway.app import create_app
    from shared.config import InsecureSettings, settings_error

    try:
        app = create_app(bind_host=args.host)
    except (InsecureSettings, ValidationError) as exc:
        raise SystemExit(f"error: {settings_error(exc)}") from None
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
