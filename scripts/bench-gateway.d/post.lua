-- wrk script: POST the body in $BENCH_BODY as JSON to the given URL.
-- With $BENCH_DELAY_MS set, each connection waits that long before each
-- request (a paced load, well below saturation: latency then measures the
-- hop, not the queue for the CPU).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")

local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pace and pace > 0 then
    function delay()
        return pace
    end
end
