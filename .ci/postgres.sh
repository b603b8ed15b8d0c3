# Sourced by .ci/run: a throwaway PostgreSQL server for the store's tests (tests/test_store.py).
#
# Installs PostgreSQL when no initdb is found (Debian, as root), makes a cluster in a temp dir, starts it on
# 127.0.0.1 (trust auth: it listens on loopback only and lives for one CI run), creates the role and database
# `tunesmith_test`, exports TUNESMITH_TEST_POSTGRES and stops the server when the sourcing script exits.
# Without this the tests still run; their PostgreSQL cases skip.

find_postgres_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# initdb and the server refuse to run as root: as root, run them as the `postgres` user.
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

POSTGRES_BIN="$(find_postgres_bin)"
if [ -z "$POSTGRES_BIN" ] || [ ! -x "$POSTGRES_BIN/initdb" ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
    POSTGRES_BIN="$(find_postgres_bin)"
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
fi

# The first free port from 54329 up (bash's /dev/tcp connects only where something listens).
POSTGRES_PORT=54329
while (exec 3<>"/dev/tcp/127.0.0.1/$POSTGRES_PORT") 2>/dev/null; do POSTGRES_PORT=$((POSTGRES_PORT + 1)); done

POSTGRES_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tunesmith-postgres.XXXXXX")"
if [ "$(id -u)" = 0 ]; then chown postgres: "$POSTGRES_DIR"; fi

stop_postgres() {
    as_postgres "$POSTGRES_BIN/pg_ctl" -D "$POSTGRES_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$POSTGRES_DIR"
}
trap stop_postgres EXIT

# (cd: the postgres user may not be able to read the checkout, and pg_ctl starts the server in the cwd)
(cd "$POSTGRES_DIR" && as_postgres "$POSTGRES_BIN/initdb" -D "$POSTGRES_DIR/data" -U postgres -A trust \
    --encoding=UTF8 --no-sync >/dev/null)
# fsync off: a throwaway cluster need not survive a crash; the socket goes in the temp dir, not /run.
if ! (cd "$POSTGRES_DIR" && as_postgres "$POSTGRES_BIN/pg_ctl" -D "$POSTGRES_DIR/data" -l "$POSTGRES_DIR/server.log" \
        -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -k $POSTGRES_DIR -c fsync=off" start >/dev/null); then
    cat "$POSTGRES_DIR/server.log" >&2
    exit 1
fi
(cd "$POSTGRES_DIR" && as_postgres "$POSTGRES_BIN/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$POSTGRES_PORT" \
    -U postgres -d postgres -c "CREATE ROLE tunesmith LOGIN" -c "CREATE DATABASE tunesmith_test OWNER tunesmith")

export TUNESMITH_TEST_POSTGRES="postgresql+psycopg://tunesmith@127.0.0.1:$POSTGRES_PORT/tunesmith_test"
echo "PostgreSQL $("$POSTGRES_BIN/postgres" --version | awk '{print $3}') for the tests: $TUNESMITH_TEST_POSTGRES"
