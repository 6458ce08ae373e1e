// CUDA backend: host code only (runtime API + cudart), no kernels, so nvcc is not needed.
// May call the feeders (feeder.h) and the CUDA runtime, nothing else.
//
// Streams: one non-blocking stream per direction, so the two copy engines work at once and
// neither direction queues behind the other or behind torch's legacy default stream. Streams are
// never destroyed (see shutdown()).
// Feeding (feeder.h): each direction's feeder thread queues chunks on its stream, each chunk
// bracketed by a start and an end event, and keeps at most max_in_flight chunks unfinished by
// blocking on the oldest end event (created with cudaEventBlockingSync, so the feeder sleeps
// instead of spinning a core).
// Ordering: cudaStreamWaitEvent, device side, never a host sync on the caller's thread:
//   - after_stream: an event recorded on the caller's stream when the transfer is issued, waited
//     on by the transfer's streams before its first chunk;
//   - deps: the dep's finish events (the last end event of each of its legs), waited on before
//     the leg's first chunk; the feeders start a leg only once its deps are fully queued, because
//     a stream may only wait for an event that has already been recorded;
//   - a swap's fill chunk i waits for the end event of its eviction chunk i.
// Event lifetime: an op's events are destroyed with the op, which the engine holds until every
// one of them has completed (done()), so no pending cudaStreamWaitEvent ever refers to a
// destroyed event; the feeders hold the op while they still use its events.
// Timing: busy time is the sum over chunks of end - start, read once the op is done.
#include <cuda_runtime.h>

#include <chrono>
#include <deque>

#include "feeder.h"

namespace hift {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw EngineError(std::string(what) + " failed: " + cudaGetErrorString(err));
  }
}

std::string failure(cudaError_t err, const char* what) {
  cudaGetLastError();
  return std::string(what) + " failed: " + cudaGetErrorString(err);
}

// Makes `device` current for the calling thread and restores the previous one: calls arrive
// from whatever thread Python runs on, with whatever device torch made current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

cudaEvent_t new_event(unsigned flags) {
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, flags), "cudaEventCreate");
  return e;
}

class CudaOp final : public FedOp {
 public:
  struct ChunkEvents {
    cudaEvent_t start = nullptr;
    cudaEvent_t end = nullptr;
  };

  CudaOp(uint64_t ticket, size_t chunk, std::vector<Leg> legs, const std::vector<OpPtr>& deps,
         int device)
      : FedOp(ticket, chunk, std::move(legs), deps), device_(device) {
    // Sized up front: the fill's feeder reads the eviction's entries while its feeder writes
    // later ones, so the vectors must never reallocate.
    for (size_t i = 0; i < this->legs.size(); ++i) events_[i].resize(this->legs[i].chunks);
  }
  ~CudaOp() override {
    if (after_) cudaEventDestroy(after_);
    for (auto& leg : events_)
      for (auto& e : leg) {
        if (e.start) cudaEventDestroy(e.start);
        if (e.end) cudaEventDestroy(e.end);
      }
  }

  bool done() override {
    if (!submitted()) return false;
    for (cudaEvent_t e : finish_events()) {
      cudaError_t err = cudaEventQuery(e);
      if (err == cudaErrorNotReady) return false;
      if (err != cudaSuccess) fail(failure(err, "transfer (cudaEventQuery)"));
    }
    return true;
  }
  void wait() override {
    wait_submitted();
    for (cudaEvent_t e : finish_events()) {
      cudaError_t err = cudaEventSynchronize(e);
      if (err != cudaSuccess) fail(failure(err, "transfer (cudaEventSynchronize)"));
    }
  }
  // A stream may only wait for an event that is already recorded, and the feeders record an
  // op's events as they queue its chunks: so the host blocks here until the op is fully queued
  // (at most max_in_flight chunks before its end), then the stream waits device side. In steady
  // state the prefetch was issued a whole forward/backward earlier and is long queued: no block.
  void make_stream_wait(uintptr_t stream) override {
    wait_submitted();
    DeviceGuard guard(device_);
    for (cudaEvent_t e : finish_events())
      check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), e, 0), "cudaStreamWaitEvent");
  }
  void account(Counters& c) override {
    for (size_t i = 0; i < legs.size(); ++i) {
      double seconds = 0.0;
      for (const ChunkEvents& e : events_[i]) {
        float ms = 0.f;
        check(cudaEventElapsedTime(&ms, e.start, e.end), "cudaEventElapsedTime");
        seconds += ms * 1e-3;
      }
      c.bytes[legs[i].dir] += legs[i].bytes;
      c.busy_seconds[legs[i].dir] += seconds;
      c.transfers[legs[i].dir] += 1;
    }
  }

  // The last end event recorded on each leg: once they complete, every chunk queued so far has
  // (a stream runs its work in order). Read after submitted(), when no feeder writes any more.
  std::vector<cudaEvent_t> finish_events() const {
    std::vector<cudaEvent_t> out;
    for (size_t i = 0; i < legs.size(); ++i)
      if (recorded_[i]) out.push_back(events_[i][recorded_[i] - 1].end);
    return out;
  }

  cudaEvent_t after_ = nullptr;        // recorded on the caller's stream at issue
  std::vector<ChunkEvents> events_[2];  // per leg, per chunk
  size_t recorded_[2] = {0, 0};         // chunks of each leg whose end event is recorded

 private:
  int device_;
};

class CudaBackend final : public Backend, ChunkQueue {
 public:
  CudaBackend(int device, size_t max_in_flight) : device_(device) {
    DeviceGuard guard(device_);
    for (auto& s : streams_) check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    feeders_ = std::make_unique<Feeders>(static_cast<ChunkQueue&>(*this), max_in_flight);  // after the streams exist
  }
  ~CudaBackend() override {
    try {
      shutdown();
    } catch (...) {
      // A destructor must not throw; a failing device is reported by the calls before.
    }
  }

  std::string name() const override { return "cuda"; }
  std::vector<uintptr_t> streams() const override {
    return {reinterpret_cast<uintptr_t>(streams_[kH2D]), reinterpret_cast<uintptr_t>(streams_[kD2H])};
  }

  std::shared_ptr<void> host_alloc(size_t bytes) override {
    DeviceGuard guard(device_);
    void* p = nullptr;
    // Portable: pinned for every context, so torch's copies see it as pinned too.
    check(cudaHostAlloc(&p, bytes, cudaHostAllocPortable), "cudaHostAlloc");
    // The deleter runs wherever the last owner lets go (possibly at process exit, after the
    // runtime is gone): it cannot report an error, and frees what it can.
    return track_allocation(p, [](void* q) { cudaFreeHost(q); });
  }
  bool host_register(void* p, size_t bytes) override {
    DeviceGuard guard(device_);
    cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterPortable);
    if (err == cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();
      return false;  // already pinned (e.g. torch's pin_memory): use it, leave it pinned
    }
    check(err, "cudaHostRegister");
    return true;
  }
  void host_unregister(void* p) override {
    DeviceGuard guard(device_);
    check(cudaHostUnregister(p), "cudaHostUnregister");
  }
  void check_device(uintptr_t ptr, size_t, const char* what) override {
    if (ptr == 0) throw std::invalid_argument(std::string(what) + " is a null pointer");
    cudaPointerAttributes attr{};
    cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr));
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::invalid_argument(std::string(what) + " is not device memory (" +
                                  cudaGetErrorString(err) + ")");
    }
    if (attr.type != cudaMemoryTypeDevice)
      throw std::invalid_argument(std::string(what) + " is not device memory");
    if (attr.device != device_)
      throw std::invalid_argument(std::string(what) + " is on device " + std::to_string(attr.device) +
                                  ", the engine on device " + std::to_string(device_));
  }

  OpPtr copy(uint64_t ticket, Direction dir, const std::vector<Segment>& segments, size_t chunk,
             const std::vector<OpPtr>& deps, std::optional<uintptr_t> after_stream) override {
    std::vector<FedOp::Leg> legs{FedOp::make_leg(dir, FedOp::Leg::kCopy, segments, chunk)};
    return enqueue(std::make_shared<CudaOp>(ticket, chunk, std::move(legs), deps, device_), after_stream);
  }

  OpPtr swap(uint64_t ticket, uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from,
             size_t bytes, size_t chunk, const std::vector<OpPtr>& deps,
             std::optional<uintptr_t> after_stream) override {
    std::vector<FedOp::Leg> legs{
        FedOp::make_leg(kD2H, FedOp::Leg::kEvict, {{evict_to, slot, bytes}}, chunk),
        FedOp::make_leg(kH2D, FedOp::Leg::kFill, {{slot, fill_from, bytes}}, chunk)};
    return enqueue(std::make_shared<CudaOp>(ticket, chunk, std::move(legs), deps, device_), after_stream);
  }

  void record_schedule(bool on) override { feeders_->record(on); }
  std::vector<ScheduleEntry> schedule() override { return feeders_->log(); }

  // Stops the feeders and waits for the streams, but never destroys them: torch's caching
  // allocator records an event on every stream a block was record_stream-ed on when that block
  // is freed, which may happen long after close(). Two streams per engine are left to the process.
  void shutdown() override {
    if (closed_) return;
    closed_ = true;
    feeders_->stop();
    DeviceGuard guard(device_);
    for (auto& s : streams_) cudaStreamSynchronize(s);
    for (auto& ring : unfinished_) ring.clear();
  }

 private:
  OpPtr enqueue(std::shared_ptr<CudaOp> op, std::optional<uintptr_t> after_stream) {
    if (after_stream) {
      // Captured now, in the caller's thread: "the work queued so far" on its stream.
      DeviceGuard guard(device_);
      op->after_ = new_event(cudaEventDisableTiming);
      check(cudaEventRecord(op->after_, reinterpret_cast<cudaStream_t>(*after_stream)), "cudaEventRecord");
    }
    feeders_->enqueue(op);
    return op;
  }

  // ChunkQueue, on the feeder threads. unfinished_[dir] belongs to dir's feeder alone.
  void feeder_started(Direction) override {
    cudaSetDevice(device_);  // on failure every later call on this thread reports the error
  }

  // Blocking on an event costs a wake-up (tens of microseconds, not yet measured here), which a
  // small chunk beats: one of kPollBytes or less (~20 us at 50 GB/s) is polled for up to
  // kPollFor first, so that tiny chunks do not each pay a wake-up. Larger chunks are blocked on
  // at once: the chunk queued behind them keeps the copy engine busy through the wake-up.
  static constexpr size_t kPollBytes = size_t(1) << 20;
  static constexpr std::chrono::microseconds kPollFor{50};

  void make_room(Direction dir, size_t limit) override {
    auto& ring = unfinished_[dir];
    while (!ring.empty()) {
      Unfinished& oldest = ring.front();
      cudaError_t err = cudaEventQuery(oldest.end);
      if (err == cudaErrorNotReady) {
        if (ring.size() < limit) return;
        if (oldest.bytes <= kPollBytes) {
          auto until = std::chrono::steady_clock::now() + kPollFor;
          while ((err = cudaEventQuery(oldest.end)) == cudaErrorNotReady &&
                 std::chrono::steady_clock::now() < until) {
          }
        }
        if (err == cudaErrorNotReady) err = cudaEventSynchronize(oldest.end);
      }
      if (err != cudaSuccess) oldest.op->fail(failure(err, "transfer chunk"));
      ring.pop_front();
    }
  }

  void start_leg(const FedOpPtr& op, size_t leg) override {
    auto& c = static_cast<CudaOp&>(*op);
    cudaStream_t s = streams_[op->legs[leg].dir];
    if (c.after_) check(cudaStreamWaitEvent(s, c.after_, 0), "cudaStreamWaitEvent");
    // Every dep is fully queued (the feeders start a leg only then): its finish events exist.
    for (const FedOpPtr& dep : op->deps)
      for (cudaEvent_t e : static_cast<CudaOp&>(*dep).finish_events())
        check(cudaStreamWaitEvent(s, e, 0), "cudaStreamWaitEvent");
  }

  void feed(const FedOpPtr& op, size_t leg, size_t index, const std::vector<Segment>& pieces) override {
    auto& c = static_cast<CudaOp&>(*op);
    const FedOp::Leg& l = op->legs[leg];
    cudaStream_t s = streams_[l.dir];
    // Slot bytes of chunk i may be overwritten once the eviction has read them.
    if (l.role == FedOp::Leg::kFill)
      check(cudaStreamWaitEvent(s, c.events_[FedOp::kEvictLeg][index].end, 0), "cudaStreamWaitEvent");
    CudaOp::ChunkEvents& e = c.events_[leg][index];
    e.start = new_event(cudaEventDefault);
    e.end = new_event(cudaEventBlockingSync);
    check(cudaEventRecord(e.start, s), "cudaEventRecord");
    auto kind = l.dir == kH2D ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
    cudaError_t copied = cudaSuccess;
    for (const Segment& p : pieces) {
      copied = cudaMemcpyAsync(reinterpret_cast<void*>(p.dst), reinterpret_cast<const void*>(p.src),
                               p.bytes, kind, s);
      if (copied != cudaSuccess) break;
    }
    // Recorded after a failed copy too: it then covers the pieces already queued, so that the
    // op's finish events still say when its memory is no longer touched.
    check(cudaEventRecord(e.end, s), "cudaEventRecord");
    c.recorded_[leg] = index + 1;
    size_t bytes = 0;
    for (const Segment& p : pieces) bytes += p.bytes;
    unfinished_[l.dir].push_back({op, e.end, bytes});
    check(copied, "cudaMemcpyAsync");
  }

  int device_;
  cudaStream_t streams_[2] = {nullptr, nullptr};
  bool closed_ = false;
  struct Unfinished {
    FedOpPtr op;
    cudaEvent_t end;
    size_t bytes;
  };
  std::deque<Unfinished> unfinished_[2];  // chunks fed, oldest first
  std::unique_ptr<Feeders> feeders_;      // last: uses all of the above
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, size_t max_in_flight) {
  return std::make_unique<CudaBackend>(device, max_in_flight);
}

Probe probe(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Probe{"host", std::string("cuda: no device: ") + cudaGetErrorString(err), "", 0};
  }
  if (count == 0) return Probe{"host", "cuda: no device: none found", "", 0};
  if (device >= count)
    return Probe{"host", "cuda: no device " + std::to_string(device) + " (found " +
                             std::to_string(count) + ")", "", count};
  cudaDeviceProp prop{};
  err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Probe{"host", std::string("cuda: device unusable: ") + cudaGetErrorString(err), "", count};
  }
  return Probe{"cuda", std::string("cuda: device ") + std::to_string(device) + " (" + prop.name + ")",
               prop.name, count};
}

bool built_with_cuda() { return true; }
int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace hift
