#!/usr/bin/env bash
# End to end, side by side, in one run: tmdb-proxy beside nginx (plain proxy_pass, and limit_req
# keyed by $arg_api_key), all in front of the same cheap upstream (nginx `return 200` with a
# TMDB-sized JSON body), over HTTP/1.1 (wrk) and HTTP/2 cleartext (h2load), rounds interleaved.
#
# Targets:
#   upstream      the upstream directly (the floor)
#   nginx         nginx proxy_pass, no limit
#   nginx-limit   nginx proxy_pass + limit_req on $arg_api_key (rate too high to bite)
#   bare          a minimal hyper proxy (examples/bare_proxy.rs): the framework's own cost
#   proxy         tmdb-proxy, reject mode, limit 50/s per key (not biting: KEYS keys)
#   nginx-429     nginx limit_req, one key far over 50 r/s (its refusals)
#   proxy-429     tmdb-proxy, one key far over 50/s (its refusals)
# For each: requests/s, p50, p99, and CPU ms per 1,000 requests of the proxy's own processes
# (nginx: master and workers; never the upstream's or the load generator's), medians of the
# rounds, and ratios to nginx-limit (nginx-429 for the 429 paths). The machine is shared and
# noisy: read the ratios.
#
#   bash benches/load.sh                       # DURATION=10s ROUNDS=3 CONNS=64 KEYS=10000
#   DURATION=5s ROUNDS=1 bash benches/load.sh  # a quick look
#   PROTOCOLS=h1 bash benches/load.sh          # wrk only (h2: h2load only)
#
# Installs wrk, nginx and h2load (nghttp2-client) with apt-get when missing. Every process it
# starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
KEYS=${KEYS:-10000}
PROTOCOLS=${PROTOCOLS:-h1 h2}
# h2load: connections and streams per connection.
H2_CONNS=${H2_CONNS:-32}
H2_STREAMS=${H2_STREAMS:-16}
# Upstream keep-alive connections, the same for both proxies.
UPSTREAM_CONNS=${UPSTREAM_CONNS:-64}
export KEYS

# shellcheck source=benches/common.sh
source benches/common.sh
for tool in nginx:nginx h2load:nghttp2-client; do
    if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
        echo "installing ${tool#*:}..." >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}") >/dev/null
    fi
done
cargo build --release --quiet --bin tmdb-proxy --example bare_proxy

start_static_upstream

# nginx as the proxy under test: a plain port, a limit_req port and a port limited at 50 r/s,
# each with an h2c twin (prior knowledge, as h2load speaks it).
nginx_plain=$(free_port) nginx_limit=$(free_port) nginx_429=$(free_port)
nginx_plain2=$(free_port) nginx_limit2=$(free_port) nginx_4292=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<NGINX
$(nginx_main "$work/nginx")
http {
    access_log off;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    limit_req_zone \$arg_api_key zone=wide:16m rate=1000000r/s;
    limit_req_zone \$arg_api_key zone=tmdb:16m rate=50r/s;
    limit_req_status 429;
    upstream up { server 127.0.0.1:$sim_port; keepalive $UPSTREAM_CONNS; }
    server {
        listen 127.0.0.1:$nginx_plain;
        listen 127.0.0.1:$nginx_plain2 http2;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$nginx_limit;
        listen 127.0.0.1:$nginx_limit2 http2;
        location / {
            limit_req zone=wide burst=1000 nodelay;
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$nginx_429;
        listen 127.0.0.1:$nginx_4292 http2;
        location / {
            limit_req zone=tmdb;
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
start_nginx "$work/nginx"
wait_port "$nginx_plain"

# tmdb-proxy: one process (2 worker threads, one per core, like nginx's 2 workers), cache off so
# every request is proxied as nginx's are.
start_proxy ./target/release/tmdb-proxy proxy "$UPSTREAM_CONNS" "[limit]
requests_per_second = 50
mode = \"reject\"
max_keys = 0
[cache]
enabled = false"
proxy_pid=$proxy_pid
proxy_port=$proxy_port

# hyper and tokio with nothing of tmdb-proxy: the same 2 workers and upstream connections.
bare_port=$(free_port)
./target/release/examples/bare_proxy "127.0.0.1:$bare_port" "127.0.0.1:$sim_port" "$UPSTREAM_CONNS" &
bare_pid=$!
pids+=("$bare_pid")
wait_port "$bare_port"


# The URIs h2load cycles through: KEYS keys, or one hot key.
python3 - "$work" "$KEYS" <<'PY'
import sys
work, keys = sys.argv[1], int(sys.argv[2])
with open(f"{work}/keys.txt", "w") as f:
    for i in range(keys):
        f.write(f"/3/movie/550?api_key=bench-key-{i}\n")
PY
seconds=${DURATION%s}

# load PROTO BASE_URL MANY|ONE: prints "requests p50_ms p99_ms 2xx".
load() {
    local proto=$1 base=$2 keys=$3
    if [ "$proto" = h1 ]; then
        local out
        if [ "$keys" = many ]; then
            out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s benches/keys.lua "$base/3/movie/550")
        else
            out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$base/3/movie/550?api_key=one-hot-key")
        fi
        echo "$out" >>"$work/wrk.log"
        python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def ms(label):
    m = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % re.escape(label), out, re.M)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
total = int(re.search(r"(\d+) requests in", out).group(1))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
print(f"{total} {ms('50%'):.2f} {ms('99%'):.2f} {total - (int(bad.group(1)) if bad else 0)}")
PY
    else
        local uris="$work/keys.txt" log="$work/h2.log"
        if [ "$keys" = one ]; then
            uris="$work/one.txt"
            echo "/3/movie/550?api_key=one-hot-key" >"$uris"
        fi
        rm -f "$log"
        h2load -c "$H2_CONNS" -m "$H2_STREAMS" -t "$THREADS" -D "$seconds" -i "$uris" \
            --log-file="$log" -B "$base" >>"$work/h2load.out" 2>&1
        python3 - "$log" <<'PY'
import sys
rows = [line.split("\t") for line in open(sys.argv[1]) if line.strip()]
if not rows:
    sys.exit("h2load logged no requests (see h2load.out)")
times = sorted(int(r[2]) for r in rows)
ok = sum(1 for r in rows if r[1].startswith("2"))
def pct(p):
    return times[min(len(times) - 1, int(len(times) * p))] / 1000
print(f"{len(times)} {pct(0.50):.2f} {pct(0.99):.2f} {ok}")
PY
    fi
}

targets="upstream nginx nginx-limit bare proxy nginx-429 proxy-429"
# target_url PROTO TARGET
target_url() {
    case "$1:$2" in
        h1:upstream) echo "http://127.0.0.1:$sim_port" ;;
        h2:upstream) echo "http://127.0.0.1:$sim_port2" ;;
        h1:nginx) echo "http://127.0.0.1:$nginx_plain" ;;
        h2:nginx) echo "http://127.0.0.1:$nginx_plain2" ;;
        h1:nginx-limit) echo "http://127.0.0.1:$nginx_limit" ;;
        h2:nginx-limit) echo "http://127.0.0.1:$nginx_limit2" ;;
        h1:nginx-429) echo "http://127.0.0.1:$nginx_429" ;;
        h2:nginx-429) echo "http://127.0.0.1:$nginx_4292" ;;
        *:bare) echo "http://127.0.0.1:$bare_port" ;;
        *:proxy | *:proxy-429) echo "http://127.0.0.1:$proxy_port" ;;
    esac
}

hz=$(getconf CLK_TCK)
results="$work/results.txt"
echo "load: wrk -t$THREADS -c$CONNS / h2load -c$H2_CONNS -m$H2_STREAMS, $DURATION each, $ROUNDS interleaved rounds, $KEYS keys, $(nproc) cores ($(uname -m)), all on loopback" >&2
for round in $(seq "$ROUNDS"); do
    for proto in $PROTOCOLS; do
        for target in $targets; do
            case $target in
                *-429) keys=one ;;
                *) keys=many ;;
            esac
            case $target in
                proxy*) watched="$proxy_pid" ;;
                bare) watched="$bare_pid" ;;
                nginx*) watched=$(nginx_pids) ;;
                *) watched="" ;;
            esac
            # shellcheck disable=SC2086
            before=$(ticks $watched)
            read -r total p50 p99 ok < <(load "$proto" "$(target_url "$proto" "$target")" "$keys")
            # shellcheck disable=SC2086
            after=$(ticks $watched)
            echo "$proto $target $round $total $p50 $p99 $ok $((after - before))" >>"$results"
            echo "  round $round $proto $target: $total requests, p99 $p99 ms" >&2
        done
    done
done

python3 - "$results" "$hz" "$seconds" <<'PY'
import math, statistics, sys
path, hz, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
runs = {}
for line in open(path):
    proto, target, _round, total, p50, p99, ok, ticks = line.split()
    runs.setdefault((proto, target), []).append(
        (int(total), float(p50), float(p99), int(ok), int(ticks))
    )
def med(values):
    return statistics.median(values)
def figures(key):
    rows = runs[key]
    rps = med([r[0] / seconds for r in rows])
    cpu = med([r[4] * 1000 / hz / r[0] * 1000 for r in rows if r[0]])
    return {
        "rps": rps,
        "p50": med([r[1] for r in rows]),
        "p99": med([r[2] for r in rows]),
        "p99s": (min(r[2] for r in rows), max(r[2] for r in rows)),
        "cpu": cpu,
        "cpus": (min(r[4] * 1e6 / hz / r[0] for r in rows), max(r[4] * 1e6 / hz / r[0] for r in rows)),
        "ok": med([r[3] / seconds for r in rows]),
    }
names = {
    "upstream": "upstream directly",
    "nginx": "nginx `proxy_pass`, no limit",
    "nginx-limit": "nginx `limit_req` on `$arg_api_key`",
    "bare": "minimal hyper proxy (no limit)",
    "proxy": "tmdb-proxy, reject mode",
    "nginx-429": "nginx `limit_req`, one key over 50 r/s",
    "proxy-429": "tmdb-proxy, one key over 50/s",
}
print("| protocol | target | req/s | p50 ms | p99 ms (range) | CPU ms per 1,000 (range) | req/s ratio | CPU ratio |")
print("|---|---|---|---|---|---|---|---|")
for proto in ["h1", "h2"]:
    if not any(k[0] == proto for k in runs):
        continue
    label = "HTTP/1.1" if proto == "h1" else "HTTP/2"
    for target in ["upstream", "nginx", "nginx-limit", "bare", "proxy", "nginx-429", "proxy-429"]:
        f = figures((proto, target))
        base = "nginx-429" if target.endswith("429") else "nginx-limit"
        b = figures((proto, base))
        cpu = "-" if target == "upstream" else f"{f['cpu']:.1f} ({f['cpus'][0]:.1f}-{f['cpus'][1]:.1f})"
        ratio = "-" if target == "upstream" else f"{f['rps'] / b['rps']:.2f}"
        cpu_ratio = "-" if target == "upstream" else f"{f['cpu'] / b['cpu']:.2f}"
        print(f"| {label} | {names[target]} | {f['rps']:,.0f} | {f['p50']:.2f} | {f['p99']:.2f} ({f['p99s'][0]:.2f}-{f['p99s'][1]:.2f}) | {cpu} | {ratio} | {cpu_ratio} |")
    f = figures((proto, "proxy-429"))
    # The most a run of this length can admit: 50 in each 1.05 s window it touches.
    ceiling = 50 * math.ceil(seconds / 1.05) / seconds
    p, bare = figures((proto, "proxy")), figures((proto, "bare"))
    print(f"\n{label}: tmdb-proxy against the minimal hyper proxy: {p['cpu'] / bare['cpu']:.2f}x the CPU per request, {p['rps'] / bare['rps']:.2f}x the requests/s")
    print(f"{label}: tmdb-proxy one-key run admitted {f['ok']:.1f}/s, the window allows at most {ceiling:.1f}/s over {seconds:g} s ({f['ok'] / ceiling:.2f}); ratios are to nginx `limit_req` (429 rows: to nginx's refusals)\n")
PY
