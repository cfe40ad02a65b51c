-- wrk script for `python -m bench`: POST chat completions, print the figures as one JSON line.
--
-- Arguments after `--`, in order:
--   1 scenario      small | stream | mix
--   2 small body    file with the non-streaming request body
--   3 stream body   file with the streaming request body
--   4 token         bearer token for every request, or "-" for none
--   5 keys file     one token per line, rotated per request (gateway-cold), or "-"
--   6 first key     index into the keys file where this run starts
--   7 threads       wrk's -t, so threads take interleaved keys and never share one
--   8 mix period    in the mix, every period-th request streams
--
-- done() prints "BENCH_JSON {...}" with the request count, duration, errors and a grid of
-- latency percentiles (microseconds) that the bench merges across rounds.

local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

local function read_file(path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  return data
end

function init(args)
  scenario = args[1]
  small_body = read_file(args[2])
  stream_body = read_file(args[3])
  headers = { ["Content-Type"] = "application/json" }
  if args[4] ~= "-" then
    headers["Authorization"] = "Bearer " .. args[4]
  end
  keys = nil
  if args[5] ~= "-" then
    keys = {}
    for line in io.lines(args[5]) do
      keys[#keys + 1] = line
    end
  end
  next_key = tonumber(args[6]) + thread_index
  key_step = tonumber(args[7])
  mix_period = tonumber(args[8])
  sent = 0
  -- Requests that never change are formatted once, so wrk spends nothing per request.
  static_small = wrk.format("POST", nil, headers, small_body)
  static_stream = wrk.format("POST", nil, headers, stream_body)
end

function request()
  local streaming = scenario == "stream"
    or (scenario == "mix" and sent % mix_period == mix_period - 1)
  sent = sent + 1
  if keys == nil then
    if streaming then
      return static_stream
    end
    return static_small
  end
  headers["Authorization"] = "Bearer " .. keys[next_key % #keys + 1]
  next_key = next_key + key_step
  if streaming then
    return wrk.format("POST", nil, headers, stream_body)
  end
  return wrk.format("POST", nil, headers, small_body)
end

local function percentile_grid()
  local grid = {}
  for tenth = 5, 995, 5 do
    grid[#grid + 1] = tenth / 10
  end
  for _, p in ipairs({ 99.6, 99.7, 99.8, 99.9, 99.95, 99.99 }) do
    grid[#grid + 1] = p
  end
  return grid
end

function done(summary, latency, requests)
  local points = {}
  local min, mean = 0, 0
  if summary.requests > 0 then
    for _, p in ipairs(percentile_grid()) do
      points[#points + 1] = string.format("[%g,%d]", p, latency:percentile(p))
    end
    points[#points + 1] = string.format("[100,%d]", latency.max)
    min, mean = latency.min, latency.mean
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,'
      .. '"read":%d,"write":%d,"status":%d,"timeout":%d},"min_us":%d,"mean_us":%f,'
      .. '"percentiles":[%s]}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, min, mean,
    table.concat(points, ",")
  ))
end
