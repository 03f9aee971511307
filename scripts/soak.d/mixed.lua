-- wrk script for scripts/soak: alternates plain and streaming chat
-- requests ($SOAK_PLAIN_BODY, $SOAK_STREAM_BODY) and checks every answer:
-- status 200, a plain answer has "choices", a streamed one ends with
-- "data: [DONE]". done() prints one line: "soak-lua plain=N stream=N bad=N".
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local plain = os.getenv("SOAK_PLAIN_BODY")
local stream = os.getenv("SOAK_STREAM_BODY")

local threads = {}
function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    i = 0
    n_plain = 0
    n_stream = 0
    bad = 0
    plain_req = wrk.format("POST", nil, nil, plain)
    stream_req = wrk.format("POST", nil, nil, stream)
end

function request()
    i = i + 1
    if i % 2 == 0 then
        return stream_req
    end
    return plain_req
end

function response(status, headers, body)
    if status ~= 200 then
        bad = bad + 1
    elseif string.find(body, "data: ", 1, true) then
        n_stream = n_stream + 1
        if not string.find(body, "data: [DONE]", 1, true) then
            bad = bad + 1
        end
    else
        n_plain = n_plain + 1
        if not string.find(body, "\"choices\"", 1, true) then
            bad = bad + 1
        end
    end
end

function done(summary, latency, requests)
    local p, s, b = 0, 0, 0
    for _, t in ipairs(threads) do
        p = p + t:get("n_plain")
        s = s + t:get("n_stream")
        b = b + t:get("bad")
    end
    io.write(string.format("soak-lua plain=%d stream=%d bad=%d\n", p, s, b))
end
