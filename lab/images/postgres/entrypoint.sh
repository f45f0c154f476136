#!/bin/sh
# Makes a cluster in an empty $PGDATA, then becomes the server (exec: postgres gets the
# container's stop signal). Extra arguments go to postgres (e.g. -c port=5433).
#
# $PGDATA is a subdirectory of the volume: a fresh filesystem's root holds lost+found and,
# under a pod's fsGroup, belongs to root:<fsGroup>, while initdb wants an empty directory that
# the server's user owns with mode 0700. The group's write bit on the root lets us create it.
set -eu
: "${PGDATA:?PGDATA must name the data directory}"
if [ "$(id -u)" = 0 ]; then
    echo "zvolt-postgres: run as the postgres user (uid 999), not as root" >&2
    exit 1
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    # Local (socket) logins are trusted: kubectl exec psql. TCP logins need the password in
    # $POSTGRES_PASSWORD; without one, no TCP login succeeds (pg_isready still answers).
    pwfile=""
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    fi
    initdb --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 ${pwfile:+--pwfile="$pwfile"}
    [ -z "$pwfile" ] || rm -f "$pwfile"
    # initdb's host lines cover loopback only; other pods connect from the pod network.
    printf 'host all all 0.0.0.0/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
fi
exec postgres -c listen_addresses=0.0.0.0 "$@"
