// Host backend: the feeder threads (feeder.h) stand in for the copy streams and copy each chunk
// themselves with memcpy, one chunk at a time, so "queued" means "done" and an op's completion
// flag stands in for an event. Used when the module is built without CUDA or no GPU is usable,
// and by the CPU test suite, which runs the real scheduling and concurrency through it: an
// ordering bug shows up as wrong bytes. May call the feeders and the C library, nothing else.
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "feeder.h"

namespace hift {
namespace {

using Clock = std::chrono::steady_clock;

class HostOp final : public FedOp {
 public:
  using FedOp::FedOp;

  bool done() override { return submitted(); }
  void wait() override { wait_submitted(); }
  // The "compute stream" of the host backend is the calling thread, whose work is already
  // done when it asks: waiting on the host is the device-side wait.
  void make_stream_wait(uintptr_t) override { wait(); }
  void account(Counters& c) override {
    for (size_t i = 0; i < legs.size(); ++i) {
      c.bytes[legs[i].dir] += legs[i].bytes;
      c.busy_seconds[legs[i].dir] += busy_[i];
      c.transfers[legs[i].dir] += 1;
    }
  }

  // Written by the leg's feeder only, read by account() once the op is done.
  double busy_[2] = {0.0, 0.0};
};

class HostBackend final : public Backend, ChunkQueue {
 public:
  explicit HostBackend(size_t max_in_flight) : feeders_(*this, max_in_flight) {}
  ~HostBackend() override { shutdown(); }

  std::string name() const override { return "host"; }
  std::vector<uintptr_t> streams() const override { return {}; }

  std::shared_ptr<void> host_alloc(size_t bytes) override {
    // Page-aligned, like pinned memory, so alignment bugs show up here too.
    size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(4096, rounded);
    if (!p) throw EngineError("alloc_host: out of host memory for " + std::to_string(bytes) + " bytes");
    return track_allocation(p, [](void* q) { std::free(q); });
  }
  bool host_register(void*, size_t) override { return false; }  // nothing to pin
  void host_unregister(void*) override {}
  void check_device(uintptr_t ptr, size_t, const char* what) override {
    if (ptr == 0) throw std::invalid_argument(std::string(what) + " is a null pointer");
  }

  OpPtr copy(uint64_t ticket, Direction dir, const std::vector<Segment>& segments, size_t chunk,
             const std::vector<OpPtr>& deps, std::optional<uintptr_t>) override {
    std::vector<FedOp::Leg> legs{FedOp::make_leg(dir, FedOp::Leg::kCopy, segments, chunk)};
    auto op = std::make_shared<HostOp>(ticket, chunk, std::move(legs), deps);
    feeders_.enqueue(op);
    return op;
  }

  OpPtr swap(uint64_t ticket, uintptr_t slot, uintptr_t evict_to, uintptr_t fill_from,
             size_t bytes, size_t chunk, const std::vector<OpPtr>& deps,
             std::optional<uintptr_t>) override {
    std::vector<FedOp::Leg> legs{
        FedOp::make_leg(kD2H, FedOp::Leg::kEvict, {{evict_to, slot, bytes}}, chunk),
        FedOp::make_leg(kH2D, FedOp::Leg::kFill, {{slot, fill_from, bytes}}, chunk)};
    auto op = std::make_shared<HostOp>(ticket, chunk, std::move(legs), deps);
    feeders_.enqueue(op);
    return op;
  }

  void record_schedule(bool on) override { feeders_.record(on); }
  std::vector<ScheduleEntry> schedule() override { return feeders_.log(); }
  void shutdown() override { feeders_.stop(); }

 private:
  // ChunkQueue. The copy is done when feed() returns: nothing is ever in flight, and a leg's
  // deps, fully fed before it starts, are done.
  void feeder_started(Direction) override {}
  void make_room(Direction, size_t) override {}
  void start_leg(const FedOpPtr&, size_t) override {}
  void feed(const FedOpPtr& op, size_t leg, size_t, const std::vector<Segment>& pieces) override {
    auto start = Clock::now();
    for (const Segment& p : pieces)
      std::memcpy(reinterpret_cast<void*>(p.dst), reinterpret_cast<const void*>(p.src), p.bytes);
    static_cast<HostOp&>(*op).busy_[leg] += std::chrono::duration<double>(Clock::now() - start).count();
  }

  Feeders feeders_;  // last: its threads call back into this object
};

}  // namespace

std::unique_ptr<Backend> make_host_backend(size_t max_in_flight) {
  return std::make_unique<HostBackend>(max_in_flight);
}

#ifndef HIFT_RT_WITH_CUDA
Probe probe(int) { return Probe{"host", "built without CUDA (toolkit not found at build time)", "", 0}; }
bool built_with_cuda() { return false; }
int cuda_runtime_version() { return 0; }
#endif

}  // namespace hift
