// Host backend: a worker thread per direction stands in for a copy stream, sequence order in
// each worker's queue stands in for stream order, and an op's completion flag for an event.
// Used when the module is built without CUDA or no GPU is usable, and by the CPU test suite,
// which runs the real concurrency through it: an ordering bug shows up as wrong bytes.
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>

#include "engine.h"

namespace hift {
namespace {

using Clock = std::chrono::steady_clock;

class HostOp final : public Op {
 public:
  explicit HostOp(int parts) : parts_left_(parts) {}

  bool done() override {
    std::lock_guard<std::mutex> lock(mu_);
    return parts_left_ == 0;
  }
  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return parts_left_ == 0; });
  }
  // The "compute stream" of the host backend is the calling thread, whose work is already
  // done when it asks: waiting on the host is the device-side wait.
  void make_stream_wait(uintptr_t) override { wait(); }
  void account(Counters& c) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (int d = 0; d < 2; ++d) {
      c.bytes[d] += bytes_[d];
      c.busy_seconds[d] += busy_[d];
      c.transfers[d] += bytes_[d] ? 1 : 0;
    }
  }

  void part_done(Direction dir, size_t bytes, double busy) {
    std::lock_guard<std::mutex> lock(mu_);
    bytes_[dir] += bytes;
    busy_[dir] += busy;
    --parts_left_;
    cv_.notify_all();
  }
  void chunk_evicted() {
    std::lock_guard<std::mutex> lock(mu_);
    ++chunks_evicted_;
    cv_.notify_all();
  }
  void wait_evicted(size_t chunks) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return chunks_evicted_ >= chunks; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int parts_left_;
  size_t chunks_evicted_ = 0;
  size_t bytes_[2] = {0, 0};
  double busy_[2] = {0.0, 0.0};
};

struct Task {
  enum Kind { kCopy, kEvict, kFill };
  std::shared_ptr<HostOp> op;
  Kind kind;
  Direction dir;
  char* dst;
  const char* src;
  size_t bytes;
  size_t chunk;
  std::vector<OpPtr> deps;
};

// One direction's "stream": runs its tasks in submission order.
class Worker {
 public:
  Worker() : thread_([this] { run(); }) {}
  ~Worker() { stop(); }

  void push(Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
  }
  // Runs what is queued, then ends the thread.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      // Deps were issued earlier than this task, and each worker runs in issue order, so
      // these waits cannot form a cycle.
      for (auto& dep : task.deps) dep->wait();
      execute(task);
    }
  }

  static void execute(Task& t) {
    double busy = 0.0;
    size_t index = 0;
    for (size_t off = 0; off < t.bytes; off += t.chunk, ++index) {
      size_t n = std::min(t.chunk, t.bytes - off);
      // A fill chunk overwrites slot bytes only after the eviction has read them.
      if (t.kind == Task::kFill) t.op->wait_evicted(index + 1);
      auto start = Clock::now();
      std::memcpy(t.dst + off, t.src + off, n);
      busy += std::chrono::duration<double>(Clock::now() - start).count();
      if (t.kind == Task::kEvict) t.op->chunk_evicted();
    }
    t.op->part_done(t.dir, t.bytes, busy);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

class HostBackend final : public Backend {
 public:
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
  void check_device(uintptr_t ptr, size_t bytes, const char* what) override {
    if (ptr == 0) throw std::invalid_argument(std::string(what) + " is a null pointer");
    if (bytes == 0) throw std::invalid_argument("transfer size is 0 bytes");
  }

  OpPtr copy(Direction dir, void* dst, const void* src, size_t bytes, size_t chunk,
             const std::vector<OpPtr>& deps, std::optional<uintptr_t>) override {
    auto op = std::make_shared<HostOp>(1);
    workers_[dir].push(Task{op, Task::kCopy, dir, static_cast<char*>(dst),
                            static_cast<const char*>(src), bytes, chunk, deps});
    return op;
  }

  OpPtr swap(void* slot, void* evict_to, const void* fill_from, size_t bytes, size_t chunk,
             const std::vector<OpPtr>& deps, std::optional<uintptr_t>) override {
    auto op = std::make_shared<HostOp>(2);
    workers_[kD2H].push(Task{op, Task::kEvict, kD2H, static_cast<char*>(evict_to),
                             static_cast<const char*>(slot), bytes, chunk, deps});
    workers_[kH2D].push(Task{op, Task::kFill, kH2D, static_cast<char*>(slot),
                             static_cast<const char*>(fill_from), bytes, chunk, deps});
    return op;
  }

  void shutdown() override {
    for (auto& w : workers_) w.stop();
  }

 private:
  Worker workers_[2];
};

}  // namespace

std::unique_ptr<Backend> make_host_backend() { return std::make_unique<HostBackend>(); }

#ifndef HIFT_RT_WITH_CUDA
Probe probe(int) { return Probe{"host", "built without CUDA (toolkit not found at build time)", "", 0}; }
bool built_with_cuda() { return false; }
int cuda_runtime_version() { return 0; }
#endif

}  // namespace hift
