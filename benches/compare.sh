#!/usr/bin/env bash
# Two tmdb-proxy binaries side by side in one run (a change's before and after), in front of the
# same tmdb-sim, interleaved rounds of wrk: requests/s, p99, and CPU ms per 1,000 requests of each
# proxy process (utime + stime from /proc over the round). The machine is shared and noisy:
# compare the medians of the two columns, not figures across runs.
#
#   bash benches/compare.sh OLD_BINARY NEW_BINARY [TMDB_SIM_BINARY | nginx]
#   ROUNDS=5 DURATION=6s CONNS=64 bash benches/compare.sh /tmp/before/tmdb-proxy target/release/tmdb-proxy nginx
#
# With `nginx` the upstream is nginx answering from memory (benches/common.sh), which costs far
# less CPU than tmdb-sim and so disturbs the proxies' figures less.
#
# Both proxies run in reject mode with a limit too high to bite, 1,000 keys round-robin, up to 64
# upstream connections. Installs wrk with apt-get if missing. Every process it starts is stopped
# by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

OLD=${1:?usage: compare.sh OLD_BINARY NEW_BINARY [TMDB_SIM_BINARY]}
NEW=${2:?usage: compare.sh OLD_BINARY NEW_BINARY [TMDB_SIM_BINARY]}
SIM=${3:-target/release/tmdb-sim}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNS=${CONNS:-64}

# shellcheck source=benches/common.sh
source benches/common.sh
if [ "$SIM" = nginx ]; then
    start_static_upstream
else
    [ -x "$SIM" ] || cargo build --release --quiet --bin tmdb-sim
    sim_port=$(free_port)
    "$SIM" --listen "127.0.0.1:$sim_port" --rate-limit 0 2>"$work/sim.log" &
    pids+=($!)
    wait_port "$sim_port"
fi

# The cache is off: every request is proxied (its hit path is benches/cache_hits.sh).
reject="[limit]
requests_per_second = 1000000
mode = \"reject\"
[cache]
enabled = false"
start_proxy "$OLD" old 64 "$reject"
old_pid=$proxy_pid
old_port=$proxy_port
start_proxy "$NEW" new 64 "$reject"
new_pid=$proxy_pid
new_port=$proxy_port

ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
round() { # pid port
    local before after out
    before=$(cpu "$1")
    out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s benches/keys.lua "http://127.0.0.1:$2/3/movie/550")
    after=$(cpu "$1")
    python3 - "$out" "$before" "$after" "$ticks" <<'PY'
import re, sys
out, before, after, ticks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)
cpu_ms = (after - before) * 1000 / ticks
print(f"{rps:.0f} {p99} {cpu_ms / total * 1000:.2f}")
PY
}

echo "| round | old req/s | new req/s | old p99 | new p99 | old CPU ms/1000 | new CPU ms/1000 |"
echo "|---|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
    read -r o_rps o_p99 o_cpu < <(round "$old_pid" "$old_port")
    read -r n_rps n_p99 n_cpu < <(round "$new_pid" "$new_port")
    echo "| $r | $o_rps | $n_rps | $o_p99 | $n_p99 | $o_cpu | $n_cpu |"
done
