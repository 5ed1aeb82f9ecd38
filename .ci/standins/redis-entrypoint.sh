#!/bin/sh
# Entrypoint of the redis stand-in (.ci/standins/redis.Dockerfile): a command that starts with an option
# runs redis-server with it; redis-server gets --protected-mode no first (options given later win) and
# runs as the redis user (setpriv execs, so redis gets the stop signal), owning /data.
set -eu
case "${1:-}" in
  -*) set -- redis-server "$@" ;;
esac
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
  if [ "$(id -u)" = 0 ]; then
    chown -R redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
