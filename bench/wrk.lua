-- wrk script for `python -m bench`: POST chat completions, time every request, print JSON.
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
-- Why time requests here: wrk's own latency histogram is corrected for coordinated
-- omission after the run (stats_correct adds synthetic samples at value - k * mean
-- interval), which inflates tails and makes a mix of short and long requests meaningless.
-- The bench runs one connection per thread (-t = -c), so each thread has one request in
-- flight and request() -> response() is exactly one request's latency. Each thread keeps
-- a histogram (1 us buckets below 1 ms, 3 significant digits above); done() merges them
-- and prints "BENCH_JSON {...}" with the histogram, statuses, errors and, for reference,
-- wrk's corrected percentiles.

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock_id, bench_timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1000000 + tonumber(timespec.tv_nsec) / 1000
end

local function bucket(us)
  if us < 1000 then
    return math.floor(us)
  end
  local scale = 10 ^ (math.floor(math.log10(us)) - 2)
  return math.floor(us / scale + 0.5) * scale
end

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  threads[#threads + 1] = thread
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
  started_us = 0
  histogram = {}
  statuses = {}
  -- Requests that never change are formatted once, so wrk spends nothing per request.
  static_small = wrk.format("POST", nil, headers, small_body)
  static_stream = wrk.format("POST", nil, headers, stream_body)
end

local function next_request()
  local streaming = scenario == "stream"
    or (scenario == "mix" and sent % mix_period == mix_period - 1)
  sent = sent + 1
  if keys == nil then
    return streaming and static_stream or static_small
  end
  headers["Authorization"] = "Bearer " .. keys[next_key % #keys + 1]
  next_key = next_key + key_step
  return wrk.format("POST", nil, headers, streaming and stream_body or small_body)
end

function request()
  local formatted = next_request()
  started_us = now_us()
  return formatted
end

function response(status, response_headers, body)
  local key = bucket(now_us() - started_us)
  histogram[key] = (histogram[key] or 0) + 1
  statuses[status] = (statuses[status] or 0) + 1
end

local function merged(name)
  local total = {}
  for _, thread in ipairs(threads) do
    for key, count in pairs(thread:get(name)) do
      total[key] = (total[key] or 0) + count
    end
  end
  return total
end

local function pairs_json(map)
  local items = {}
  for key, count in pairs(map) do
    items[#items + 1] = string.format("[%d,%d]", key, count)
  end
  return "[" .. table.concat(items, ",") .. "]"
end

function done(summary, latency, requests)
  local corrected = {}
  if summary.requests > 0 then
    for _, p in ipairs({ 50, 90, 99, 99.9 }) do
      corrected[#corrected + 1] = string.format('"%g":%d', p, latency:percentile(p))
    end
  end
  local errors = summary.errors
  io.write(
    string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,'
        .. '"read":%d,"write":%d,"status":%d,"timeout":%d},"histogram":%s,"statuses":%s,'
        .. '"wrk_corrected":{%s}}\n',
      summary.requests,
      summary.duration,
      summary.bytes,
      errors.connect,
      errors.read,
      errors.write,
      errors.status,
      errors.timeout,
      pairs_json(merged("histogram")),
      pairs_json(merged("statuses")),
      table.concat(corrected, ",")
    )
  )
end
