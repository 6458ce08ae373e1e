// The transfer engine: moves bytes between host buffers it knows and device memory on streams of
// its own, hands out tickets, and orders transfers that touch the same bytes.
//
// It knows nothing of torch: raw addresses, byte counts and stream handles (as integers), so one
// build works with any torch version. Two backends share this front end and the feeders
// (feeder.h), which schedule every transfer chunk by chunk:
//   - cuda: one non-blocking stream per direction, events for ordering, pinned host memory;
//   - host: the feeder threads copy with memcpy themselves, under the same ordering rules.
//
// Scheduling: a transfer is cut into chunks. One feeder per direction hands the chunks of the
// queued transfers to its copy stream, round-robin between the transfers that may run, keeping at
// most `max_in_flight` chunks queued on the stream. So a small transfer issued during a long one
// waits about one chunk, not the whole long one, and a small synchronous copy of someone else's
// (torch's `.item()`) never finds dozens of our chunks ahead of it in the copy engine.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace hift {

// 8 MiB: large enough that per-chunk overhead (a copy launch ~5 us, plus the feeder's events,
// issued while the chunk ahead runs) stays a few % of the chunk's ~150 us at 55 GB/s, small
// enough that a swap's two directions overlap for all but one chunk.
constexpr size_t kDefaultChunkBytes = size_t(8) << 20;
// Two chunks queued per stream: one running, the next already queued behind it, so the copy
// engine never idles while its feeder wakes up (tens of microseconds) to queue the third.
constexpr size_t kDefaultMaxInFlight = 2;

// A failure of the engine or of CUDA (surfaces in Python as hift_rt._C.EngineError, a
// RuntimeError). Bad arguments throw std::invalid_argument instead (Python ValueError).
struct EngineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum Direction : int { kH2D = 0, kD2H = 1 };

struct Counters {
  uint64_t bytes[2] = {0, 0};
  double busy_seconds[2] = {0.0, 0.0};
  uint64_t transfers[2] = {0, 0};
};

// A byte range [begin, end) that a transfer reads or writes; used to order transfers that
// touch the same bytes.
struct Range {
  uintptr_t begin;
  uintptr_t end;
  bool write;
};

// One contiguous piece of a transfer: `bytes` from src to dst. A transfer carries one or more
// (e.g. the same element range of several state fields, copied into one device buffer).
struct Segment {
  uintptr_t dst;
  uintptr_t src;
  size_t bytes;
};

// One transfer in flight. The backends implement it (through FedOp, feeder.h); the engine sees
// only this interface. No method throws for a failed transfer: a failure is data (error()), read
// by the engine once the op has finished.
class Op {
 public:
  virtual ~Op() = default;
  virtual bool done() = 0;                              // finished (or failed); never blocks
  virtual void wait() = 0;                              // the host blocks until done()
  // `stream` waits for the op, device side. The host blocks until the op is fully queued on the
  // copy streams (see CudaOp::make_stream_wait); the host backend blocks until it is done.
  virtual void make_stream_wait(uintptr_t stream) = 0;
  virtual void account(Counters& counters) = 0;         // once done: add bytes, busy time
  virtual std::string error() = 0;                      // empty unless the transfer failed
  std::vector<Range> ranges;
};
using OpPtr = std::shared_ptr<Op>;

// One entry of the schedule log (Engine::record_schedule): a transfer's leg queued on a feeder,
// or one of its chunks handed to the copy stream, in the order the feeders did it.
struct ScheduleEntry {
  bool fed;       // false: queued; true: chunk `chunk` handed to the stream
  uint64_t ticket;
  Direction dir;
  size_t chunk;   // 0 for a queued entry
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // {h2d stream, d2h stream} as integers (cudaStream_t); the host backend has none.
  virtual std::vector<uintptr_t> streams() const = 0;
  // Host memory whose deleter frees it (cudaFreeHost / free); the deleter depends on nothing
  // but the CUDA runtime, so the memory may outlive the backend (see Engine::host_view).
  virtual std::shared_ptr<void> host_alloc(size_t bytes) = 0;
  // Returns false when the memory was already pinned by someone else (nothing to undo later).
  virtual bool host_register(void* ptr, size_t bytes) = 0;
  virtual void host_unregister(void* ptr) = 0;
  // Throws std::invalid_argument when [ptr, ptr + bytes) cannot be device memory here.
  virtual void check_device(uintptr_t ptr, size_t bytes, const char* what) = 0;
  // Queue a transfer on the feeders. kH2D: host src -> device dst; kD2H: device src -> host dst,
  // every segment (each non-empty) as one op. It starts after every op in `deps` and, when given,
  // after the work queued so far on `after_stream` (captured now, in the caller's thread).
  virtual OpPtr copy(uint64_t ticket, Direction dir, const std::vector<Segment>& segments,
                     size_t chunk, const std::vector<OpPtr>& deps,
                     std::optional<uintptr_t> after_stream) = 0;
  // slot -> evict_to (D2H) and fill_from -> slot (H2D), chunk i of the fill starting once
  // chunk i of the eviction is done, so both directions run at once.
  virtual OpPtr swap(uint64_t ticket, uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from,
                     size_t bytes, size_t chunk, const std::vector<OpPtr>& deps,
                     std::optional<uintptr_t> after_stream) = 0;
  virtual void record_schedule(bool on) = 0;
  virtual std::vector<ScheduleEntry> schedule() = 0;
  // Called once, after every op is done: stop the feeders, drain the streams.
  virtual void shutdown() = 0;
};

std::unique_ptr<Backend> make_host_backend(size_t max_in_flight);
#ifdef HIFT_RT_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device, size_t max_in_flight);
#endif

// What "auto" would pick on this machine and why.
struct Probe {
  std::string backend;      // "cuda" or "host"
  std::string reason;       // e.g. "cuda: no device: CUDA driver version is insufficient ..."
  std::string device_name;  // empty without a device
  int device_count = 0;
};
Probe probe(int device);
bool built_with_cuda();
int64_t live_host_allocations();  // engine-allocated host buffers not yet freed (leak checks)
std::shared_ptr<void> track_allocation(void* ptr, void (*release)(void*));
int cuda_runtime_version();  // CUDART_VERSION, 0 without CUDA

// Thread-safe. The engine's lock is never held while a call blocks: waits copy the ops they
// wait for, release the lock, wait, and re-take it to retire what finished.
class Engine {
 public:
  // backend: "auto" (cuda when a device is usable, else host), "cuda" (error when unusable)
  // or "host". max_in_flight: chunks queued on each copy stream at most (>= 1).
  Engine(const std::string& backend, int device, size_t chunk_bytes, size_t max_in_flight);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& backend() const { return backend_name_; }
  const std::string& reason() const { return reason_; }
  const std::string& device_name() const { return device_name_; }
  int device() const { return device_; }
  size_t chunk_bytes() const { return chunk_bytes_; }
  size_t max_in_flight() const { return max_in_flight_; }
  std::vector<uintptr_t> streams();

  // Host buffers: allocated and freed by the engine (pinned under CUDA), or registered.
  // Freeing or unregistering waits for every transfer in flight that touches the buffer; from
  // the call on, new transfers touching it are refused.
  // Ownership of allocated memory is shared with the views handed out by host_view: free_host
  // and close() drop the engine's share, the memory goes when the last view does.
  uintptr_t alloc_host(size_t bytes);
  void free_host(uintptr_t ptr);
  void register_host(uintptr_t ptr, size_t bytes);
  void unregister_host(uintptr_t ptr);
  // [ptr, ptr + bytes) inside a known host buffer, with a share of its ownership (null for
  // registered memory, which its owner keeps alive).
  std::shared_ptr<void> host_view(uintptr_t ptr, size_t bytes);

  // Transfers. Each returns a ticket (1, 2, 3, ...). A transfer starts after every earlier
  // transfer that touches the same bytes (one of them writing), after the tickets in `deps`,
  // and after the work queued on `after_stream` so far. chunk 0 means the engine's default.
  // kH2D: host src -> device dst; kD2H: device src -> host dst. A transfer's device-side bytes
  // must not overlap its host-side bytes, nor its written bytes each other.
  // A transfer of 0 bytes in all moves nothing: its ticket is done at once (its deps are checked
  // but not waited for).
  uint64_t copy(Direction dir, const std::vector<Segment>& segments,
                const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                size_t chunk);
  uint64_t swap(uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from, size_t bytes,
                const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                size_t chunk);

  // Waits raise EngineError when the transfer waited for failed.
  bool query(uint64_t ticket);
  void wait(uint64_t ticket);
  void wait_stream(uint64_t ticket, uintptr_t stream);
  void wait_range(uintptr_t ptr, size_t bytes);  // every transfer touching these bytes
  void synchronize();
  size_t in_flight();
  Counters counters();
  void reset_counters();
  // Schedule log: record_schedule(true) clears it and starts recording, false stops.
  void record_schedule(bool on);
  std::vector<ScheduleEntry> schedule();
  // Waits for every transfer in flight, releases host buffers, stops the feeders. Idempotent; a
  // call made while another is closing waits for it to finish.
  void close();
  bool closed();

 private:
  struct HostBuffer {
    size_t bytes;
    std::shared_ptr<void> memory;  // allocated here; null when registered
    bool pinned;                   // registered and pinned by us, so unregistered by us
    bool releasing = false;        // free_host / unregister_host is waiting for its transfers
  };
  using Lock = std::unique_lock<std::mutex>;
  void check_open() const;
  void check_host(uintptr_t ptr, size_t bytes, const char* what);
  void check_transfer_host(uintptr_t ptr, size_t bytes, const char* what);  // + not being freed
  size_t pick_chunk(size_t chunk) const;
  void retire_done();  // account and drop finished ops
  void check_ticket(uint64_t ticket) const;  // issued, and its transfer did not fail
  OpPtr find_op(uint64_t ticket);  // the op in flight, or null when done
  std::vector<OpPtr> resolve(const std::vector<uint64_t>& deps);
  std::vector<OpPtr> overlapping(const std::vector<Range>& ranges);
  uint64_t submit(uint64_t ticket, OpPtr op, std::vector<Range> ranges);
  // Waits for `ops` with the lock released, re-takes it and retires; returns the first failure.
  std::string wait_unlocked(Lock& lock, const std::vector<OpPtr>& ops);
  void release_host(uintptr_t ptr, bool allocated);  // free_host / unregister_host
  const HostBuffer* find_host(uintptr_t ptr, size_t bytes, uintptr_t* base) const;

  std::mutex mu_;
  std::condition_variable closed_cv_;  // signals close_finished_
  std::unique_ptr<Backend> backend_;
  std::string backend_name_, reason_, device_name_;
  int device_ = 0;
  size_t chunk_bytes_;
  size_t max_in_flight_;
  bool closed_ = false;
  bool close_finished_ = false;
  uint64_t next_ticket_ = 1;
  std::map<uint64_t, OpPtr> in_flight_;
  std::map<uint64_t, std::string> failed_;  // retired tickets whose transfer failed
  std::map<uintptr_t, HostBuffer> host_buffers_;
  Counters counters_;
};

}  // namespace hift
