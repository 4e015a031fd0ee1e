-- wrk script for the benchmark scripts: distinct API keys, round-robin; KEYS of them (default
-- 1,000).
local keys = tonumber(os.getenv("KEYS") or "1000")
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/3/movie/550?api_key=bench-key-" .. (n % keys))
end
