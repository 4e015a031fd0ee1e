#!/usr/bin/env bash
# End-to-end load benchmark, all on loopback, in one run:
#   (a) wrk -> tmdb-sim directly (the baseline)
#   (b) wrk -> tmdb-proxy -> tmdb-sim, limiting on, a ceiling too high to bite, 1,000 keys
#   (c) wrk -> tmdb-proxy, one key far over its limit (mostly local 429s: the cheapest path)
#   (d) wrk -> nginx proxy_pass + limit_req keyed by $arg_api_key -> tmdb-sim, if nginx is installed
# Prints requests/s and p50/p99 latency for each, as ratios to (a), and the proxy's peak RSS.
#
#   bash benches/load.sh                 # 10 s per scenario, 64 connections, 2 wrk threads
#   DURATION=5s CONNS=128 bash benches/load.sh
#
# Installs wrk with apt-get if it is missing. Every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
# Upstream connections the proxy may open. nginx keeps no cap on active upstream connections, so
# the comparison lifts the proxy's (TMDB's edge allows ~20 per IP: keep 20 in production).
UPSTREAM_CONNS=${UPSTREAM_CONNS:-$CONNS}

# shellcheck source=benches/common.sh
source benches/common.sh
cargo build --release --quiet --bin tmdb-proxy --bin tmdb-sim

sim_port=$(free_port)
./target/release/tmdb-sim --listen "127.0.0.1:$sim_port" --rate-limit 0 2>"$work/sim.log" &
pids+=($!)
wait_port "$sim_port"

# The cache is off: every request is proxied, as nginx's are (its hit path is benches/cache.rs).
start_proxy ./target/release/tmdb-proxy proxied "$UPSTREAM_CONNS" "[limit]
requests_per_second = 1000000
mode = \"reject\"
[cache]
enabled = false"
proxied_pid=$proxy_pid
proxied_port=$proxy_port
start_proxy ./target/release/tmdb-proxy limited "$UPSTREAM_CONNS" "[limit]
requests_per_second = 50
mode = \"reject\"
[cache]
enabled = false"
limited_port=$proxy_port

nginx_port=""
if command -v nginx >/dev/null 2>&1; then
    nginx_port=$(free_port)
    mkdir -p "$work/nginx"
    cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    limit_req_zone \$arg_api_key zone=tmdb:16m rate=1000000r/s;
    limit_req_status 429;
    upstream sim { server 127.0.0.1:$sim_port; keepalive 32; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            limit_req zone=tmdb burst=1000 nodelay;
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
    nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
    pids+=($!)
    wait_port "$nginx_port"
fi

# Runs wrk; prints "requests_per_second p50_ms p99_ms non2xx".
run() {
    local url=$1 script=${2:-}
    local out
    if [ -n "$script" ]; then
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$script" "$url")
    else
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$url")
    fi
    echo "$out" >>"$work/wrk.log"
    python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def ms(label):
    m = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % re.escape(label), out, re.M)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
total = int(re.search(r"(\d+) requests in", out).group(1))
print(f"{rps:.0f} {ms('50%'):.2f} {ms('99%'):.2f} {int(non2xx.group(1)) if non2xx else 0} {total}")
PY
}

echo "load: wrk -t$THREADS -c$CONNS -d$DURATION on $(nproc) cores ($(uname -m)), all on loopback; proxy upstream.max_connections = $UPSTREAM_CONNS" >&2
read -r a_rps a_p50 a_p99 a_bad a_total < <(run "http://127.0.0.1:$sim_port/3/movie/550" benches/keys.lua)
read -r b_rps b_p50 b_p99 b_bad b_total < <(run "http://127.0.0.1:$proxied_port/3/movie/550" benches/keys.lua)
read -r c_rps c_p50 c_p99 c_bad c_total < <(run "http://127.0.0.1:$limited_port/3/movie/550?api_key=one-hot-key")
if [ -n "$nginx_port" ]; then
    read -r d_rps d_p50 d_p99 d_bad d_total < <(run "http://127.0.0.1:$nginx_port/3/movie/550" benches/keys.lua)
fi
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$proxied_pid/status" 2>/dev/null || echo 0)

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
echo "| scenario | requests/s | p50 ms | p99 ms | non-2xx | req/s vs (a) |"
echo "|---|---|---|---|---|---|"
echo "| (a) tmdb-sim directly | $a_rps | $a_p50 | $a_p99 | $a_bad | 1.00 |"
echo "| (b) tmdb-proxy, 1,000 keys, limit not biting | $b_rps | $b_p50 | $b_p99 | $b_bad | $(ratio "$b_rps" "$a_rps") |"
echo "| (c) tmdb-proxy, one key over its limit (429s) | $c_rps | $c_p50 | $c_p99 | $c_bad | $(ratio "$c_rps" "$a_rps") |"
if [ -n "$nginx_port" ]; then
    echo "| (d) nginx proxy_pass + limit_req | $d_rps | $d_p50 | $d_p99 | $d_bad | $(ratio "$d_rps" "$a_rps") |"
    echo
    echo "tmdb-proxy vs nginx: throughput $(ratio "$b_rps" "$d_rps")x, p99 $(ratio "$b_p99" "$d_p99")x; 429 path vs proxied: $(ratio "$c_rps" "$b_rps")x"
else
    echo
    echo "nginx not installed: scenario (d) skipped (apt-get install nginx to include it)"
    echo "429 path vs proxied: $(ratio "$c_rps" "$b_rps")x"
fi
echo "tmdb-proxy (b) peak RSS: $((peak_kib / 1024)) MiB"
