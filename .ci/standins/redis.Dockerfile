# Stand-in for redis:7-alpine (no registry here): Debian bookworm's redis-server 7.0 with an entrypoint that
# runs it as the redis user in /data and, like the official image, with protected mode off (other
# containers connect over the network; set a password with --requirepass).
FROM asyncthink-ci/base:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
