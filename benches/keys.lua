-- wrk script for the benchmark scripts: 1,000 distinct API keys, round-robin.
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/3/movie/550?api_key=bench-key-" .. (n % 1000))
end
