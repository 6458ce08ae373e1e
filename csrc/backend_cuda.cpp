// CUDA backend: host code only (runtime API + cudart), no kernels, so nvcc is not needed.
//
// Streams: one non-blocking stream per direction, so the two copy engines work at once and
// neither direction queues behind the other or behind torch's legacy default stream.
// Ordering: cudaStreamWaitEvent on events (device side, never a host sync). A transfer that must
// follow compute records an event on the compute stream and makes its copy stream wait on it.
// Timing: each op brackets its copies with timing events; busy time is read once the op is done.
#include <cuda_runtime.h>

#include "engine.h"

namespace hift {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw EngineError(std::string(what) + " failed: " + cudaGetErrorString(err));
  }
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

cudaEvent_t new_event(bool timing) {
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming),
        "cudaEventCreate");
  return e;
}

// Makes `stream` wait for the work queued so far on `other`, through a throwaway event.
// Destroying an event whose record is still pending is allowed: CUDA frees it once it fires.
void stream_after_stream(cudaStream_t stream, cudaStream_t other) {
  cudaEvent_t e = new_event(false);
  check(cudaEventRecord(e, other), "cudaEventRecord");
  check(cudaStreamWaitEvent(stream, e, 0), "cudaStreamWaitEvent");
  check(cudaEventDestroy(e), "cudaEventDestroy");
}

class CudaOp final : public Op {
 public:
  explicit CudaOp(int device) : device_(device) {}
  ~CudaOp() override {
    for (int d = 0; d < 2; ++d) {
      if (start_[d]) cudaEventDestroy(start_[d]);
      if (end_[d]) cudaEventDestroy(end_[d]);
    }
  }

  bool done() override {
    cudaError_t err = cudaEventQuery(finish_);
    if (err == cudaErrorNotReady) return false;
    check(err, "transfer (cudaEventQuery)");
    return true;
  }
  void wait() override {
    DeviceGuard guard(device_);
    check(cudaEventSynchronize(finish_), "transfer (cudaEventSynchronize)");
  }
  void make_stream_wait(uintptr_t stream) override {
    DeviceGuard guard(device_);
    check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), finish_, 0),
          "cudaStreamWaitEvent");
  }
  void account(Counters& c) override {
    for (int d = 0; d < 2; ++d) {
      if (!bytes_[d]) continue;
      float ms = 0.f;
      check(cudaEventElapsedTime(&ms, start_[d], end_[d]), "cudaEventElapsedTime");
      c.bytes[d] += bytes_[d];
      c.busy_seconds[d] += ms * 1e-3;
      c.transfers[d] += 1;
    }
  }

  void begin(Direction d, cudaStream_t s, size_t bytes) {
    start_[d] = new_event(true);
    end_[d] = new_event(true);
    bytes_[d] = bytes;
    check(cudaEventRecord(start_[d], s), "cudaEventRecord");
  }
  void end(Direction d, cudaStream_t s) { check(cudaEventRecord(end_[d], s), "cudaEventRecord"); }
  cudaEvent_t end_event(Direction d) const { return end_[d]; }
  void finish_on(Direction d) { finish_ = end_[d]; }

 private:
  int device_;
  cudaEvent_t start_[2] = {nullptr, nullptr};
  cudaEvent_t end_[2] = {nullptr, nullptr};
  cudaEvent_t finish_ = nullptr;
  size_t bytes_[2] = {0, 0};
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    DeviceGuard guard(device_);
    for (auto& s : streams_) check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
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
  void check_device(uintptr_t ptr, size_t bytes, const char* what) override {
    if (ptr == 0) throw std::invalid_argument(std::string(what) + " is a null pointer");
    if (bytes == 0) throw std::invalid_argument("transfer size is 0 bytes");
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

  OpPtr copy(Direction dir, void* dst, const void* src, size_t bytes, size_t chunk,
             const std::vector<OpPtr>& deps, std::optional<uintptr_t> after_stream) override {
    DeviceGuard guard(device_);
    cudaStream_t s = streams_[dir];
    wait_for(s, deps, after_stream);
    auto op = std::make_shared<CudaOp>(device_);
    op->begin(dir, s, bytes);
    auto kind = dir == kH2D ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
    for (size_t off = 0; off < bytes; off += chunk) {
      size_t n = std::min(chunk, bytes - off);
      check(cudaMemcpyAsync(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, n,
                            kind, s),
            "cudaMemcpyAsync");
    }
    op->end(dir, s);
    op->finish_on(dir);
    return op;
  }

  OpPtr swap(void* slot, void* evict_to, const void* fill_from, size_t bytes, size_t chunk,
             const std::vector<OpPtr>& deps, std::optional<uintptr_t> after_stream) override {
    DeviceGuard guard(device_);
    cudaStream_t out = streams_[kD2H], in = streams_[kH2D];
    wait_for(out, deps, after_stream);
    wait_for(in, deps, after_stream);
    auto op = std::make_shared<CudaOp>(device_);
    op->begin(kD2H, out, bytes);
    char* s = static_cast<char*>(slot);
    for (size_t off = 0; off < bytes; off += chunk) {
      size_t n = std::min(chunk, bytes - off);
      check(cudaMemcpyAsync(static_cast<char*>(evict_to) + off, s + off, n,
                            cudaMemcpyDeviceToHost, out),
            "cudaMemcpyAsync");
      // Chunk `off` of the slot may be overwritten once its eviction is done; the H2D stream
      // waits for exactly that, so chunk i+1 leaves while chunk i arrives.
      stream_after_stream(in, out);
      if (off == 0) op->begin(kH2D, in, bytes);
      check(cudaMemcpyAsync(s + off, static_cast<const char*>(fill_from) + off, n,
                            cudaMemcpyHostToDevice, in),
            "cudaMemcpyAsync");
    }
    op->end(kD2H, out);
    // The op is done when both directions are: the H2D stream also waits for the D2H end.
    check(cudaStreamWaitEvent(in, op->end_event(kD2H), 0), "cudaStreamWaitEvent");
    op->end(kH2D, in);
    op->finish_on(kH2D);
    return op;
  }

  // Waits for the streams but never destroys them: torch's caching allocator records an event
  // on every stream a block was record_stream-ed on when that block is freed, which may happen
  // long after close(). Two streams per engine are left to the process.
  void shutdown() override {
    if (closed_) return;
    closed_ = true;
    DeviceGuard guard(device_);
    for (auto& s : streams_) cudaStreamSynchronize(s);
  }

 private:
  void wait_for(cudaStream_t s, const std::vector<OpPtr>& deps, std::optional<uintptr_t> after) {
    if (after) stream_after_stream(s, reinterpret_cast<cudaStream_t>(*after));
    for (auto& dep : deps) dep->make_stream_wait(reinterpret_cast<uintptr_t>(s));
  }

  int device_;
  cudaStream_t streams_[2] = {nullptr, nullptr};
  bool closed_ = false;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

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
