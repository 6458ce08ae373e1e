// The engine's front end, shared by both backends: argument checks, host-buffer bookkeeping,
// tickets, and hazard ordering (a transfer never touches bytes that an earlier transfer in
// flight writes, nor writes bytes that one reads).
#include "engine.h"

#include <algorithm>
#include <atomic>
#include <sstream>

namespace hift {
namespace {

std::string hex(uintptr_t p) {
  std::ostringstream s;
  s << "0x" << std::hex << p;
  return s.str();
}

bool overlaps(const Range& a, const Range& b) {
  return (a.write || b.write) && a.begin < b.end && b.begin < a.end;
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

Engine::Engine(const std::string& backend, int device, size_t chunk_bytes)
    : device_(device), chunk_bytes_(chunk_bytes) {
  if (chunk_bytes == 0) throw std::invalid_argument("chunk_bytes must be > 0");
  if (device < 0) throw std::invalid_argument("device must be >= 0, got " + std::to_string(device));
  if (backend != "auto" && backend != "cuda" && backend != "host")
    throw std::invalid_argument("backend must be 'auto', 'cuda' or 'host', got '" + backend + "'");
  Probe p = backend == "host" ? Probe{"host", "host backend requested", "", 0} : probe(device);
  if (backend == "cuda" && p.backend != "cuda")
    throw EngineError("backend 'cuda' requested but unusable: " + p.reason);
#ifdef HIFT_RT_WITH_CUDA
  if (p.backend == "cuda") backend_ = make_cuda_backend(device);
#endif
  if (!backend_) backend_ = make_host_backend();
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
  std::lock_guard<std::mutex> lock(mu_);
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
  if (bytes == 0) throw std::invalid_argument("transfer size is 0 bytes");
  uintptr_t base = 0;
  if (find_host(ptr, bytes, &base)) return;
  if (find_host(ptr, 1, &base))
    throw std::invalid_argument(std::string(what) + " range [" + hex(ptr) + ", +" +
                                std::to_string(bytes) + ") runs beyond its host buffer at " +
                                hex(base) + " of " +
                                std::to_string(host_buffers_.at(base).bytes) + " bytes");
  throw std::invalid_argument(std::string(what) + " " + hex(ptr) +
                              " is not in a host buffer of this engine (never allocated or "
                              "registered here, or already freed)");
}

uintptr_t Engine::alloc_host(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (bytes == 0) throw std::invalid_argument("alloc_host: size is 0 bytes");
  std::shared_ptr<void> memory = backend_->host_alloc(bytes);
  auto ptr = reinterpret_cast<uintptr_t>(memory.get());
  host_buffers_[ptr] = HostBuffer{bytes, std::move(memory), false};
  return ptr;
}

void Engine::wait_overlapping(uintptr_t begin, uintptr_t end) {
  Range r{begin, end, true};
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    for (const Range& o : op->ranges)
      if (overlaps(o, r)) {
        op->wait();
        break;
      }
  }
  retire_done();
}

void Engine::free_host(uintptr_t ptr) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto it = host_buffers_.find(ptr);
  if (it == host_buffers_.end() || !it->second.memory)
    throw std::invalid_argument("free_host: " + hex(ptr) +
                                " is not a host buffer allocated by this engine (or already freed)");
  // A buffer is never freed under a transfer: wait for every one in flight that touches it.
  // Erasing drops the engine's share; views still held keep the memory.
  wait_overlapping(ptr, ptr + it->second.bytes);
  host_buffers_.erase(it);
}

void Engine::register_host(uintptr_t ptr, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
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

void Engine::unregister_host(uintptr_t ptr) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto it = host_buffers_.find(ptr);
  if (it == host_buffers_.end() || it->second.memory)
    throw std::invalid_argument("unregister_host: " + hex(ptr) +
                                " is not memory registered with this engine");
  wait_overlapping(ptr, ptr + it->second.bytes);
  if (it->second.pinned) backend_->host_unregister(reinterpret_cast<void*>(ptr));
  host_buffers_.erase(it);
}

std::shared_ptr<void> Engine::host_view(uintptr_t ptr, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_host(ptr, bytes, "host_view");
  uintptr_t base = 0;
  return find_host(ptr, bytes, &base)->memory;
}

void Engine::retire_done() {
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    if (it->second->done()) {
      it->second->account(counters_);
      it = in_flight_.erase(it);
    } else {
      ++it;
    }
  }
}

std::vector<OpPtr> Engine::resolve(const std::vector<uint64_t>& deps) {
  std::vector<OpPtr> ops;
  for (uint64_t t : deps) {
    if (t == 0 || t >= next_ticket_)
      throw std::invalid_argument("unknown ticket " + std::to_string(t) + " (tickets issued: 1.." +
                                  std::to_string(next_ticket_ - 1) + ")");
    auto it = in_flight_.find(t);
    if (it != in_flight_.end()) ops.push_back(it->second);
  }
  return ops;
}

std::vector<OpPtr> Engine::hazards(const std::vector<Range>& ranges) {
  std::vector<OpPtr> ops;
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    bool hit = false;
    for (const Range& a : op->ranges)
      for (const Range& b : ranges) hit = hit || overlaps(a, b);
    if (hit) ops.push_back(op);
  }
  return ops;
}

uint64_t Engine::submit(OpPtr op, std::vector<Range> ranges) {
  op->ranges = std::move(ranges);
  uint64_t ticket = next_ticket_++;
  in_flight_[ticket] = std::move(op);
  return ticket;
}

uint64_t Engine::copy(Direction dir, uintptr_t dst, uintptr_t src, size_t bytes,
                      const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                      size_t chunk) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (dir == kH2D) {
    check_host(src, bytes, "h2d source");
    backend_->check_device(dst, bytes, "h2d destination");
  } else {
    check_host(dst, bytes, "d2h destination");
    backend_->check_device(src, bytes, "d2h source");
  }
  retire_done();
  std::vector<Range> ranges{{src, src + bytes, false}, {dst, dst + bytes, true}};
  auto wait_for = resolve(deps);
  auto more = hazards(ranges);
  wait_for.insert(wait_for.end(), more.begin(), more.end());
  auto op = backend_->copy(dir, reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                           bytes, pick_chunk(chunk), wait_for, after_stream);
  return submit(std::move(op), std::move(ranges));
}

uint64_t Engine::swap(uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from, size_t bytes,
                      const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                      size_t chunk) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_host(evict_to, bytes, "swap evict_to");
  check_host(fill_from, bytes, "swap fill_from");
  backend_->check_device(slot, bytes, "swap slot");
  if (evict_to < fill_from + bytes && fill_from < evict_to + bytes)
    throw std::invalid_argument("swap: evict_to and fill_from overlap; the fill would read bytes "
                                "the eviction is writing");
  retire_done();
  std::vector<Range> ranges{{slot, slot + bytes, true},
                            {evict_to, evict_to + bytes, true},
                            {fill_from, fill_from + bytes, false}};
  auto wait_for = resolve(deps);
  auto more = hazards(ranges);
  wait_for.insert(wait_for.end(), more.begin(), more.end());
  auto op = backend_->swap(reinterpret_cast<void*>(slot), reinterpret_cast<void*>(evict_to),
                           reinterpret_cast<const void*>(fill_from), bytes, pick_chunk(chunk),
                           wait_for, after_stream);
  return submit(std::move(op), std::move(ranges));
}

bool Engine::query(uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto ops = resolve({ticket});
  if (ops.empty()) return true;
  bool done = ops[0]->done();
  retire_done();
  return done;
}

void Engine::wait(uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto ops = resolve({ticket});
  if (!ops.empty()) ops[0]->wait();
  retire_done();
}

void Engine::wait_stream(uint64_t ticket, uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto ops = resolve({ticket});
  if (!ops.empty()) ops[0]->make_stream_wait(stream);
}

void Engine::wait_range(uintptr_t ptr, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (bytes == 0) return;
  wait_overlapping(ptr, ptr + bytes);
}

void Engine::synchronize() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    op->wait();
  }
  retire_done();
}

size_t Engine::in_flight() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  retire_done();
  return in_flight_.size();
}

Counters Engine::counters() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  retire_done();
  return counters_;
}

void Engine::reset_counters() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  retire_done();
  counters_ = Counters{};
}

bool Engine::closed() {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

void Engine::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  closed_ = true;  // first, so that an error below cannot leave a half-open engine in use
  for (auto& [ticket, op] : in_flight_) {
    (void)ticket;
    op->wait();
  }
  in_flight_.clear();
  for (auto& [ptr, buf] : host_buffers_)
    if (buf.pinned) backend_->host_unregister(reinterpret_cast<void*>(ptr));
  host_buffers_.clear();  // drops the engine's share of allocated memory
  backend_->shutdown();
}

}  // namespace hift
