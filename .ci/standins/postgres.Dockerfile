# Stand-in for postgres:16-alpine (no registry here): Debian bookworm's PostgreSQL **15**, not 16, with an
# entrypoint that honours the variables compose.yaml sets (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB,
# PGDATA). Good enough for a smoke test of the stack; not a test of PostgreSQL 16.
FROM asyncthink-ci/base:bookworm
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main-cluster.conf \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
