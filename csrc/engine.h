// The transfer engine: moves bytes between host buffers it knows and device memory on streams of
// its own, hands out tickets, and orders transfers that touch the same bytes.
//
// It knows nothing of torch: raw addresses, byte counts and stream handles (as integers), so one
// build works with any torch version. Two backends share this front end:
//   - cuda: one non-blocking stream per direction, events for ordering, pinned host memory;
//   - host: one worker thread per direction standing in for a stream, the same ordering rules.
#pragma once

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

// 8 MiB: large enough that per-chunk launch overhead (~5 us) is under 2% of the chunk's time at
// 55 GB/s, small enough that a swap's two directions overlap for all but one chunk.
constexpr size_t kDefaultChunkBytes = size_t(8) << 20;

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

// One transfer in flight. Each backend subclasses it; the engine sees only this interface.
class Op {
 public:
  virtual ~Op() = default;
  virtual bool done() = 0;                                 // never blocks
  virtual void wait() = 0;                                 // the host blocks until done
  virtual void make_stream_wait(uintptr_t stream) = 0;     // `stream` waits, device side
  virtual void account(Counters& counters) = 0;            // once done: add bytes, busy time
  std::vector<Range> ranges;
};
using OpPtr = std::shared_ptr<Op>;

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
  // kH2D: host src -> device dst; kD2H: device src -> host dst. Starts after every op in
  // `deps` and, when given, after the work queued so far on `after_stream`.
  virtual OpPtr copy(Direction dir, void* dst, const void* src, size_t bytes, size_t chunk,
                     const std::vector<OpPtr>& deps, std::optional<uintptr_t> after_stream) = 0;
  // slot -> evict_to (D2H) and fill_from -> slot (H2D), chunk i of the fill starting once
  // chunk i of the eviction is done, so both directions run at once.
  virtual OpPtr swap(void* slot, void* evict_to, const void* fill_from, size_t bytes,
                     size_t chunk, const std::vector<OpPtr>& deps,
                     std::optional<uintptr_t> after_stream) = 0;
  // Called once, after every op is done: stop threads, destroy streams.
  virtual void shutdown() = 0;
};

std::unique_ptr<Backend> make_host_backend();
#ifdef HIFT_RT_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device);
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

class Engine {
 public:
  // backend: "auto" (cuda when a device is usable, else host), "cuda" (error when unusable)
  // or "host".
  Engine(const std::string& backend, int device, size_t chunk_bytes);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& backend() const { return backend_name_; }
  const std::string& reason() const { return reason_; }
  const std::string& device_name() const { return device_name_; }
  int device() const { return device_; }
  size_t chunk_bytes() const { return chunk_bytes_; }
  std::vector<uintptr_t> streams();

  // Host buffers: allocated and freed by the engine (pinned under CUDA), or registered.
  // Freeing or unregistering waits for every transfer in flight that touches the buffer.
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
  // kH2D: host src -> device dst; kD2H: device src -> host dst.
  uint64_t copy(Direction dir, uintptr_t dst, uintptr_t src, size_t bytes,
                const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                size_t chunk);
  uint64_t swap(uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from, size_t bytes,
                const std::vector<uint64_t>& deps, std::optional<uintptr_t> after_stream,
                size_t chunk);

  bool query(uint64_t ticket);
  void wait(uint64_t ticket);
  void wait_stream(uint64_t ticket, uintptr_t stream);
  void wait_range(uintptr_t ptr, size_t bytes);  // every transfer touching these bytes
  void synchronize();
  size_t in_flight();
  Counters counters();
  void reset_counters();
  void close();
  bool closed();

 private:
  struct HostBuffer {
    size_t bytes;
    std::shared_ptr<void> memory;  // allocated here; null when registered
    bool pinned;                   // registered and pinned by us, so unregistered by us
  };
  void check_open() const;
  void check_host(uintptr_t ptr, size_t bytes, const char* what);
  size_t pick_chunk(size_t chunk) const;
  void retire_done();  // account and drop finished ops
  std::vector<OpPtr> resolve(const std::vector<uint64_t>& deps);
  std::vector<OpPtr> hazards(const std::vector<Range>& ranges);
  uint64_t submit(OpPtr op, std::vector<Range> ranges);
  void wait_overlapping(uintptr_t begin, uintptr_t end);
  const HostBuffer* find_host(uintptr_t ptr, size_t bytes, uintptr_t* base) const;

  std::mutex mu_;
  std::unique_ptr<Backend> backend_;
  std::string backend_name_, reason_, device_name_;
  int device_ = 0;
  size_t chunk_bytes_;
  bool closed_ = false;
  uint64_t next_ticket_ = 1;
  std::map<uint64_t, OpPtr> in_flight_;
  std::map<uintptr_t, HostBuffer> host_buffers_;
  Counters counters_;
};

}  // namespace hift
