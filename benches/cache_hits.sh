#!/usr/bin/env bash
# The cache's hit path beside nginx proxy_cache, in one run: wrk on one hot URL (one known key)
# through tmdb-proxy with its cache on and through nginx caching the same stand-in, rounds
# interleaved (this machine is shared and noisy: read the ratios). Prints requests/s, p50, p99
# and CPU per 1,000 requests of each proxy process.
#
#   bash benches/cache_hits.sh            # DURATION=10s ROUNDS=3 THREADS=2 CONNS=64
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
source benches/common.sh

if ! command -v nginx >/dev/null 2>&1; then
    echo "installing nginx..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >/dev/null
fi
cargo build --release --quiet --bin tmdb-proxy --bin tmdb-sim

sim_port=$(free_port)
./target/release/tmdb-sim --listen "127.0.0.1:$sim_port" --rate-limit 0 2>"$work/sim.log" &
pids+=($!)
wait_port "$sim_port"

start_proxy ./target/release/tmdb-proxy cached 64 "[limit]
requests_per_second = 1000000
[cache]
enabled = true"
proxy_pid=$proxy_pid
cached_port=$proxy_port

nginx_port=$(free_port)
mkdir -p "$work/nginx/cache"
cat >"$work/nginx/nginx.conf" <<NGINX
$(nginx_main "$work/nginx")
http {
    access_log off;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    proxy_cache_path $work/nginx/cache keys_zone=tmdb:16m max_size=256m;
    upstream sim { server 127.0.0.1:$sim_port; keepalive 32; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_cache tmdb;
            proxy_cache_key \$uri\$arg_language;
            proxy_cache_valid 200 10m;
            proxy_cache_lock on;
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Cache \$upstream_cache_status;
        }
    }
}
NGINX
start_nginx "$work/nginx"
wait_port "$nginx_port"

url_proxy="http://127.0.0.1:$cached_port/3/movie/550?api_key=hot-key&language=en"
url_nginx="http://127.0.0.1:$nginx_port/3/movie/550?api_key=hot-key&language=en"
# Warm both: the key becomes known, the entry is stored.
for url in "$url_proxy" "$url_nginx"; do
    curl -s -o /dev/null "$url"; curl -s -o /dev/null "$url"
done
hit=$(curl -s -D - -o /dev/null "$url_proxy" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache" {print $2}')
[ "$hit" = "HIT" ] || { echo "tmdb-proxy does not answer from its cache (X-Cache: $hit)" >&2; exit 1; }


run() {
    local url=$1
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$url" | python3 -c '
import re, sys
out = sys.stdin.read()
def ms(label):
    m = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % re.escape(label), out, re.M)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
p50, p99 = ms("50%"), ms("99%")
print(f"{rps:.0f} {p50:.2f} {p99:.2f} {total}")'
}

hz=$(getconf CLK_TCK)
echo "cache hits: wrk -t$THREADS -c$CONNS -d$DURATION, one hot URL, $ROUNDS interleaved rounds, $(nproc) cores" >&2
echo "| round | target | requests/s | p50 ms | p99 ms | CPU ms per 1,000 requests |"
echo "|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
    for target in tmdb-proxy nginx; do
        if [ "$target" = tmdb-proxy ]; then url=$url_proxy; procs=$proxy_pid; else url=$url_nginx; procs=$(nginx_pids); fi
        # shellcheck disable=SC2086
        before=$(ticks $procs)
        read -r rps p50 p99 total < <(run "$url")
        # shellcheck disable=SC2086
        after=$(ticks $procs)
        cpu=$(python3 -c "print(f'{($after - $before) * 1000 / $hz * 1000 / $total:.1f}')")
        echo "| $round | $target | $rps | $p50 | $p99 | $cpu |"
    done
done
