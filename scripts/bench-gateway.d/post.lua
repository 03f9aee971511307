-- wrk script: POST the body in $BENCH_BODY as JSON to the given URL.
-- With $BENCH_DELAY_MS set, each connection waits about that long before
-- each request (a paced load, well below saturation: latency then measures
-- the hop, not the queue for the CPU). The wait is drawn uniformly from
-- 0.5-1.5x, so the connections do not fall into step and arrive in bursts.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")

local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pace and pace > 0 then
    function init()
        math.randomseed(os.time() + math.floor(os.clock() * 1e6))
    end
    function delay()
        return math.floor(pace * (0.5 + math.random()))
    end
end
