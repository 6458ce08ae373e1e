// The engine's front end, shared by both backends: argument checks, host-buffer bookkeeping,
// tickets, and hazard ordering (a transfer never touches bytes that an earlier transfer in
// flight writes, nor writes bytes that one reads). It may call the backend (engine.h) and
// nothing else; scheduling is the feeders' (feeder.h), behind the backend.
//
// Locking: mu_ guards the maps and counters and is never held while a call blocks. A waiting
// call copies the ops it waits for (shared_ptr) under the lock, releases it, waits, and re-takes
// it to retire what finished; anything it looked up before must be looked up again then.
//
// No iostreams in this module: messages are formatted with snprintf / std::to_string (an
// std::ostringstream here crashed inside libstdc++ under torch on an H200, issue 10).
#include "engine.h"

#include <atomic>
#include <cinttypes>
#include <cstdio>

namespace hift {
namespace {

std::string hex(uintptr_t p) {
  char text[2 + 2 * sizeof(uintptr_t) + 1];
  std::snprintf(text, sizeof text, "0x%" PRIxPTR, p);
  return text;
}

bool intersect(const Range& a, const Range& b) { return a.begin < b.end && b.begin < a.end; }
bool conflicts(const Range& a, const Range& b) { return (a.write || b.write) && intersect(a, b); }

// "h2d source", or "h2d segment 2 source" when a transfer has several segments.
std::string side(const char* op, size_t index, size_t count, const char* which) {
  std::string s = op;
  if (count > 1) s += " segment " + std::to_string(index);
  return s + " " + which;
}

std::atomic<int64_t> g_live_host_allocations{0};

}  // namespace

int64_t live_host_allocations() { return g_live_host_allocations.load(); }

std::shared_ptr<void> track_allocation(void* ptr, void (*release)(void*)) {
  ++g_live_host_allocations;
  return std::shared_ptr<void>(ptr, [release](void* p) {
    release(p);
    --g_live_host_allocations;
  });
}

Engine::Engine(const std::string& backend, int device, size_t chunk_bytes, size_t max_in_flight)
    : device_(device), chunk_bytes_(chunk_bytes), max_in_flight_(max_in_flight) {
  if (chunk_bytes == 0) throw std::invalid_argument("chunk_bytes must be > 0");
  if (max_in_flight == 0) throw std::invalid_argument("max_in_flight must be >= 1");
  if (device < 0) throw std::invalid_argument("device must be >= 0, got " + std::to_string(device));
  if (backend != "auto" && backend != "cuda" && backend != "host")
    throw std::invalid_argument("backend must be 'auto', 'cuda' or 'host', got '" + backend + "'");
  Probe p = backend == "host" ? Probe{"host", "host backend requested", "", 0} : probe(device);
  if (backend == "cuda" && p.backend != "cuda")
    throw EngineError("backend 'cuda' requested but unusable: " + p.reason);
#ifdef HIFT_RT_WITH_CUDA
  if (p.backend == "cuda") backend_ = make_cuda_backend(device, max_in_flight);
#endif
  if (!backend_) backend_ = make_host_backend(max_in_flight);
  backend_name_ = backend_->name();
  reason_ = p.reason;
  device_name_ = p.device_name;
}

Engine::~Engine() {
  try {
    close();
  } catch (...) {
    // A destructor must not throw; close() already reported the error if it was called.
  }
}

void Engine::check_open() const {
  if (closed_) throw EngineError("the transfer engine is closed");
}

size_t Engine::pick_chunk(size_t chunk) const { return chunk == 0 ? chunk_bytes_ : chunk; }

std::vector<uintptr_t> Engine::streams() {
  Lock lock(mu_);
  check_open();
  return backend_->streams();
}

const Engine::HostBuffer* Engine::find_host(uintptr_t ptr, size_t bytes, uintptr_t* base) const {
  auto it = host_buffers_.upper_bound(ptr);
  if (it == host_buffers_.begin()) return nullptr;
  --it;
  if (ptr + bytes > it->first + it->second.bytes || ptr + bytes < ptr) return nullptr;
  if (base) *base = it->first;
  return &it->second;
}

void Engine::check_host(uintptr_t ptr, size_t bytes, const char* what) {
  if (ptr == 0) throw std::invalid_argument(std::string(what) + " is a null pointer");
  uintptr_t base = 0;
  if (find_host(ptr, bytes, &base)) return;
  if (const HostBuffer* buf = find_host(ptr, 1, &base))
    throw std::invalid_argument(std::string(what) + " range [" + hex(ptr) + ", +" +
                                std::to_string(bytes) + ") runs beyond its host buffer at " +
                                hex(base) + " of " + std::to_string(buf->bytes) + " bytes");
  throw std::invalid_argument(std::string(what) + " " + hex(ptr) +
                              " is not in a host buffer of this engine (never allocated or "
                              "registered here, or already freed)");
}

void Engine::check_transfer_host(uintptr_t ptr, size_t bytes, const char* what) {
  check_host(ptr, bytes, what);
  if (find_host(ptr, bytes, nullptr)->releasing)
    throw std::invalid_argument(std::string(what) + " " + hex(ptr) +
                                " is in a host buffer that is being freed");
}

uintptr_t Engine::alloc_host(size_t bytes) {
  Lock lock(mu_);
  check_open();
  if (bytes == 0) throw std::invalid_argument("alloc_host: size is 0 bytes");
  std::shared_ptr<void> memory = backend_->host_alloc(bytes);
  auto ptr = reinterpret_cast<uintptr_t>(memory.get());
  host_buffers_[ptr] = HostBuffer{bytes, std::move(memory), false};
  return ptr;
}

void Engine::free_host(uintptr_t ptr) { release_host(ptr, true); }

void Engine::unregister_host(uintptr_t ptr) { release_host(ptr, false); }

void Engine::release_host(uintptr_t ptr, bool allocated) {
  const char* what = allocated ? "free_host" : "unregister_host";
  Lock lock(mu_);
  check_open();
  auto it = host_buffers_.find(ptr);
  if (it == host_buffers_.end() || bool(it->second.memory) != allocated)
    throw std::invalid_argument(std::string(what) + ": " + hex(ptr) +
                                (allocated ? " is not a host buffer allocated by this engine (or "
                                             "already freed)"
                                           : " is not memory registered with this engine"));
  if (it->second.releasing)
    throw std::invalid_argument(std::string(what) + ": " + hex(ptr) +
                                " is being released by another call");
  // A buffer is never freed under a transfer: refuse new ones from now on, wait for those in
  // flight (a failed one is finished too; its waiters report it).
  it->second.releasing = true;
  wait_unlocked(lock, overlapping({{ptr, ptr + it->second.bytes, true}}));
  // close() may have released every buffer while this call waited.
  it = host_buffers_.find(ptr);
  if (it == host_buffers_.end()) return;
  std::shared_ptr<void> memory = std::move(it->second.memory);
  bool pinned = it->second.pinned;
  host_buffers_.erase(it);
  if (pinned) backend_->host_unregister(reinterpret_cast<void*>(ptr));
  // The engine's share goes last, unlocked: cudaFreeHost may synchronize the device.
  lock.unlock();
  memory.reset();
}

void Engine::register_host(uintptr_t ptr, size_t bytes) {
  Lock lock(mu_);
  check_open();
  if (ptr == 0) throw std::invalid_argument("register_host: null pointer");
  if (bytes == 0) throw std::invalid_argument("register_host: size is 0 bytes");
  auto next = host_buffers_.lower_bound(ptr);
  bool clash = next != host_buffers_.end() && next->first < ptr + bytes;
  if (!clash && next != host_buffers_.begin()) {
    auto prev = std::prev(next);
    clash = prev->first + prev->second.bytes > ptr;
  }
  if (clash)
    throw std::invalid_argument("register_host: [" + hex(ptr) + ", +" + std::to_string(bytes) +
                                ") overlaps a host buffer this engine already knows");
  bool pinned = backend_->host_register(reinterpret_cast<void*>(ptr), bytes);
  host_buffers_[ptr] = HostBuffer{bytes, nullptr, pinned};
}

std::shared_ptr<void> Engine::host_view(uintptr_t ptr, size_t bytes) {
  Lock lock(mu_);
  check_open();
  check_host(ptr, bytes, "host_view");
  return find_host(ptr, bytes, nullptr)->memory;
}

void Engine::retire_done() {
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    if (it->second->done()) {
      std::string error = it->second->error();
      if (error.empty())
        it->second->account(counters_);
      else
        failed_[it->first] = error;
      it = in_flight_.erase(it);
    } else {
      ++it;
    }
  }
}

void Engine::check_ticket(uint64_t ticket) const {
  if (ticket == 0 || ticket >= next_ticket_)
    throw std::invalid_argument("unknown ticket " + std::to_string(ticket) + " (tickets issued: 1.." +
                                std::to_string(next_ticket_ - 1) + ")");
  auto failed = failed_.find(ticket);
  if (failed != failed_.end()) throw EngineError(failed->second);
}

OpPtr Engine::find_op(uint64_t ticket) {
  check_ticket(ticket);
  auto it = in_flight_.find(ticket);
  return it == in_flight_.end() ? nullptr : it->second;
}

std::vector<OpPtr> Engine::resolve(const std::vector<uint64_t>& deps) {
  std::vector<OpPtr> ops;
  for (uint64_t t : deps)
    if (OpPtr op = find_op(t)) ops.push_back(op);
  return ops;
}

std::vector<OpPtr> Engine::overlapping(const std::vector<Range>& ranges) {
  std::vector<OpPtr> ops;
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    bool hit = false;
    for (const Range& a : op->ranges)
      for (const Range& b : ranges) hit = hit || conflicts(a, b);
    if (hit) ops.push_back(op);
  }
  return ops;
}

std::string Engine::wait_unlocked(Lock& lock, const std::vector<OpPtr>& ops) {
  lock.unlock();
  std::string error;
  for (const OpPtr& op : ops) {
    op->wait();
    if (error.empty()) error = op->error();
  }
  lock.lock();
  retire_done();
  return error;
}

uint64_t Engine::copy(Direction dir, const std::vector<Segment>& segments,
                      const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                      size_t chunk) {
  const char* name = dir == kH2D ? "h2d" : "d2h";
  Lock lock(mu_);
  check_open();
  std::vector<Segment> moving;  // the non-empty segments
  std::vector<Range> reads, writes;
  for (size_t i = 0; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    if (s.bytes == 0) continue;
    std::string src = side(name, i, segments.size(), "source");
    std::string dst = side(name, i, segments.size(), "destination");
    if (s.src + s.bytes < s.src || s.dst + s.bytes < s.dst)
      throw std::invalid_argument(std::string(name) + ": segment " + std::to_string(i) +
                                  " wraps around the address space");
    if (dir == kH2D) {
      check_transfer_host(s.src, s.bytes, src.c_str());
      backend_->check_device(s.dst, s.bytes, dst.c_str());
    } else {
      check_transfer_host(s.dst, s.bytes, dst.c_str());
      backend_->check_device(s.src, s.bytes, src.c_str());
    }
    // Written bytes apart from everything else the transfer touches (its sources may overlap
    // each other): a transfer reading bytes it has already overwritten would give bytes that
    // depend on the chunking.
    Range read{s.src, s.src + s.bytes, false}, write{s.dst, s.dst + s.bytes, true};
    for (size_t j = 0; j < moving.size(); ++j) {
      if (intersect(write, writes[j]))
        throw std::invalid_argument(std::string(name) + ": the destinations of segments " +
                                    std::to_string(j) + " and " + std::to_string(i) + " overlap");
      if (intersect(write, reads[j]) || intersect(read, writes[j]))
        throw std::invalid_argument(std::string(name) + ": segments " + std::to_string(j) +
                                    " and " + std::to_string(i) +
                                    " overlap (one's destination is the other's source)");
    }
    if (intersect(write, read))
      throw std::invalid_argument(dst + " overlaps the " + (segments.size() > 1 ? "segment's " : "") +
                                  "source: a transfer's device-side and host-side bytes must be apart");
    moving.push_back(s);
    reads.push_back(read);
    writes.push_back(write);
  }
  std::vector<OpPtr> wait_for = resolve(deps);
  if (moving.empty()) return next_ticket_++;  // 0 bytes: nothing to move, done at once
  retire_done();
  std::vector<Range> ranges = reads;
  ranges.insert(ranges.end(), writes.begin(), writes.end());
  for (const OpPtr& op : overlapping(ranges)) wait_for.push_back(op);
  uint64_t ticket = next_ticket_;
  OpPtr op = backend_->copy(ticket, dir, moving, pick_chunk(chunk), wait_for, after_stream);
  return submit(ticket, std::move(op), std::move(ranges));
}

uint64_t Engine::swap(uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from, size_t bytes,
                      const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                      size_t chunk) {
  Lock lock(mu_);
  check_open();
  if (bytes == 0) {
    resolve(deps);
    return next_ticket_++;  // 0 bytes: nothing to move, done at once
  }
  check_transfer_host(evict_to, bytes, "swap evict_to");
  check_transfer_host(fill_from, bytes, "swap fill_from");
  backend_->check_device(slot, bytes, "swap slot");
  if (slot + bytes < slot)
    throw std::invalid_argument("swap: the slot wraps around the address space");
  Range slot_r{slot, slot + bytes, true}, evict_r{evict_to, evict_to + bytes, true},
      fill_r{fill_from, fill_from + bytes, false};
  if (intersect(evict_r, fill_r))
    throw std::invalid_argument("swap: evict_to and fill_from overlap; the fill would read bytes "
                                "the eviction is writing");
  if (intersect(slot_r, evict_r) || intersect(slot_r, fill_r))
    throw std::invalid_argument("swap: the slot overlaps evict_to or fill_from: a transfer's "
                                "device-side and host-side bytes must be apart");
  std::vector<OpPtr> wait_for = resolve(deps);
  retire_done();
  std::vector<Range> ranges{slot_r, evict_r, fill_r};
  for (const OpPtr& op : overlapping(ranges)) wait_for.push_back(op);
  uint64_t ticket = next_ticket_;
  OpPtr op = backend_->swap(ticket, slot, evict_to, fill_from, bytes, pick_chunk(chunk), wait_for,
                            after_stream);
  return submit(ticket, std::move(op), std::move(ranges));
}

uint64_t Engine::submit(uint64_t ticket, OpPtr op, std::vector<Range> ranges) {
  op->ranges = std::move(ranges);
  in_flight_[ticket] = std::move(op);
  return next_ticket_++;
}

bool Engine::query(uint64_t ticket) {
  Lock lock(mu_);
  check_open();
  OpPtr op = find_op(ticket);
  if (!op) return true;
  // No retire_done() here: the Python layer queries every ticket it keeps tensors for, after
  // each transfer, and retiring scans all ops; the other calls retire.
  bool done = op->done();
  if (done && !op->error().empty()) throw EngineError(op->error());
  return done;
}

void Engine::wait(uint64_t ticket) {
  Lock lock(mu_);
  check_open();
  OpPtr op = find_op(ticket);
  if (!op) return;
  std::string error = wait_unlocked(lock, {op});
  if (!error.empty()) throw EngineError(error);
}

void Engine::wait_stream(uint64_t ticket, uintptr_t stream) {
  Lock lock(mu_);
  check_open();
  OpPtr op = find_op(ticket);
  if (!op) return;
  lock.unlock();
  op->make_stream_wait(stream);  // may block until the op is fully queued (CudaOp)
  std::string error = op->error();
  if (!error.empty()) throw EngineError(error);
}

void Engine::wait_range(uintptr_t ptr, size_t bytes) {
  Lock lock(mu_);
  check_open();
  if (bytes == 0) return;
  std::string error = wait_unlocked(lock, overlapping({{ptr, ptr + bytes, true}}));
  if (!error.empty()) throw EngineError(error);
}

void Engine::synchronize() {
  Lock lock(mu_);
  check_open();
  std::vector<OpPtr> ops;
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    ops.push_back(op);
  }
  std::string error = wait_unlocked(lock, ops);
  if (!error.empty()) throw EngineError(error);
}

size_t Engine::in_flight() {
  Lock lock(mu_);
  check_open();
  retire_done();
  return in_flight_.size();
}

Counters Engine::counters() {
  Lock lock(mu_);
  check_open();
  retire_done();
  return counters_;
}

void Engine::reset_counters() {
  Lock lock(mu_);
  check_open();
  retire_done();
  counters_ = Counters{};
}

void Engine::record_schedule(bool on) {
  Lock lock(mu_);
  check_open();
  backend_->record_schedule(on);
}

std::vector<ScheduleEntry> Engine::schedule() {
  Lock lock(mu_);
  check_open();
  return backend_->schedule();
}

bool Engine::closed() {
  Lock lock(mu_);
  return closed_;
}

void Engine::close() {
  Lock lock(mu_);
  if (closed_) {
    closed_cv_.wait(lock, [&] { return close_finished_; });
    return;
  }
  closed_ = true;  // first: every other call now refuses, so nothing new starts
  std::vector<OpPtr> ops;
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    ops.push_back(op);
  }
  lock.unlock();
  for (const OpPtr& op : ops) op->wait();  // failures are reported to whoever waits on them
  lock.lock();
  in_flight_.clear();
  std::map<uintptr_t, HostBuffer> buffers;
  buffers.swap(host_buffers_);
  lock.unlock();
  std::string error;
  try {
    for (auto& [ptr, buf] : buffers)
      if (buf.pinned) backend_->host_unregister(reinterpret_cast<void*>(ptr));
  } catch (const EngineError& e) {
    error = e.what();
  }
  buffers.clear();  // drops the engine's share of allocated memory
  try {
    backend_->shutdown();
  } catch (const EngineError& e) {
    if (error.empty()) error = e.what();
  }
  lock.lock();
  close_finished_ = true;
  closed_cv_.notify_all();
  if (!error.empty()) throw EngineError(error);
}

}  // namespace hift
