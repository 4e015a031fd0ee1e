# Shared by the benchmark scripts (sourced, not run): wrk, a work directory removed on exit,
# every process started stopped by PID on exit, and loopback ports.

if ! command -v wrk >/dev/null 2>&1; then
    echo "installing wrk..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null
fi

work=$(mktemp -d)
# Append the PID of every process started: all are stopped on exit.
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# start_proxy BINARY NAME UPSTREAM_CONNECTIONS EXTRA_TOML: starts a proxy in front of the stand-in
# on $sim_port, quiet, on free ports. Sets proxy_pid and proxy_port in this shell (not in a
# subshell, so that cleanup stops it), and waits until it listens.
start_proxy() {
    local binary=$1 name=$2 connections=$3 extra=$4 admin
    proxy_port=$(free_port)
    admin=$(free_port)
    cat >"$work/$name.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy_port"
[admin]
listen = "127.0.0.1:$admin"
[upstream]
base_url = "http://127.0.0.1:$sim_port"
max_connections = $connections
[log]
level = "warn"
$extra
TOML
    "$binary" --config "$work/$name.toml" 2>"$work/$name.log" &
    proxy_pid=$!
    pids+=("$proxy_pid")
    wait_port "$proxy_port"
}

# nginx_main DIR: the top of an nginx.conf keeping its pid and error log in DIR: two workers,
# and `user root` when the script runs as root (the workers would otherwise drop to a user that
# cannot read this script's private work directory).
nginx_main() {
    if [ "$(id -u)" -eq 0 ]; then echo "user root;"; fi
    cat <<NGINX
worker_processes 2;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
NGINX
}

# start_nginx DIR: runs DIR/nginx.conf in the foreground of a child stopped on exit; sets
# nginx_master.
start_nginx() {
    nginx -p "$1" -c "$1/nginx.conf" -g 'daemon off;' 2>>"$1/error.log" &
    nginx_master=$!
    pids+=("$nginx_master")
}

# start_static_upstream: an nginx answering every request with 200 and a TMDB-sized JSON body
# from memory, the cheapest upstream to put every proxy in front of (tmdb-sim records every
# arrival, which costs more CPU than the proxies measured). Sets sim_port (HTTP/1.1) and
# sim_port2 (h2c, prior knowledge).
start_static_upstream() {
    local body='{"adult":false,"id":550,"imdb_id":"tt0137523","original_language":"en","original_title":"Fight Club","popularity":61.4,"release_date":"1999-10-15","runtime":139,"title":"Fight Club","video":false,"vote_average":8.4,"vote_count":26280}'
    sim_port=$(free_port)
    sim_port2=$(free_port)
    mkdir -p "$work/upstream"
    cat >"$work/upstream/nginx.conf" <<NGINX
$(nginx_main "$work/upstream")
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$sim_port;
        listen 127.0.0.1:$sim_port2 http2;
        location / {
            default_type "application/json;charset=utf-8";
            return 200 '$body';
        }
    }
}
NGINX
    start_nginx "$work/upstream"
    wait_port "$sim_port"
}

# ticks PID...: CPU ticks (user + system) of these processes so far; a process that has exited
# (nginx's cache loader leaves after its first minute) counts nothing.
ticks() {
    local total=0
    for pid in "$@"; do
        [ -r "/proc/$pid/stat" ] || continue
        read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null || echo)
        total=$((total + ${f[11]:-0} + ${f[12]:-0}))
    done
    echo "$total"
}

# nginx_pids: the PIDs of the nginx whose master is $nginx_master, workers included.
nginx_pids() { pgrep -P "$nginx_master" | tr '\n' ' '; echo "$nginx_master"; }
