-- wrk script: POST the body in $BENCH_BODY as JSON to the given URL.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
