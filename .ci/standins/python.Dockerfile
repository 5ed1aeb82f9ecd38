# Stand-in for python:3.11-slim (no registry here): Debian bookworm's python3 (3.11.2, not the official
# image's newest 3.11.x built from source) with a virtualenv first on PATH, so `python`, `pip install` and
# the console scripts it installs behave as in the official image (which has no PEP 668 marker).
FROM asyncthink-ci/base:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
ENV PATH=/opt/python/bin:$PATH
CMD ["python3"]
