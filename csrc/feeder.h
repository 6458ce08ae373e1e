// The feeders: how both backends schedule transfers, chunk by chunk.
//
// A transfer (FedOp) has one leg per direction it moves bytes in: a copy one, a swap two (its
// eviction on D2H and its fill on H2D). A leg is cut into chunks of the op's chunk size, counted
// over its segments laid end to end (a chunk may take pieces of several segments).
//
// One feeder thread per direction hands chunks to its backend (ChunkQueue): the CUDA backend
// queues them on the direction's stream, the host backend copies them itself. Rules:
//   - a leg starts once every op it depends on is fully queued (`submitted`): on CUDA its stream
//     then waits for those ops device side; on the host backend, where queued means done, there
//     is nothing left to wait for;
//   - chunk i of a swap's fill is fed only after chunk i of its eviction was fed (CUDA: its stream
//     also waits for that chunk's end event, device side);
//   - among the legs that may run, the one fed least recently goes next (a leg never fed goes
//     first), so a small transfer issued during a long one waits about one chunk;
//   - at most `max_in_flight` chunks fed on a direction are unfinished: the feeder first makes
//     room (ChunkQueue::make_room blocks on the oldest), then chooses, so that a leg queued while
//     it waited is served next. The host backend copies synchronously: one chunk at a time.
// Nothing here blocks a caller: callers only enqueue; waiting happens in the ops (backends).
// Owns the order in which chunks are fed; calls nothing but the ChunkQueue its backend gives it.
#pragma once

#include <atomic>
#include <list>
#include <thread>

#include "engine.h"

namespace hift {

// An op as the feeders run it. The backends subclass it (HostOp, CudaOp).
class FedOp : public Op {
 public:
  struct Leg {
    enum Role { kCopy, kEvict, kFill };
    Direction dir;
    Role role;
    std::vector<Segment> segments;  // each non-empty
    size_t bytes = 0;               // over all segments
    size_t chunks = 0;              // ceil(bytes / chunk)
    // Feeder state, under the Feeders lock.
    size_t picked = 0;              // chunks handed out by the feeder
    size_t issued = 0;              // chunks whose ChunkQueue::feed has returned
    size_t segment = 0, offset = 0; // where the next chunk starts
  };
  // A swap's legs are {evict (D2H), fill (H2D)}, in this order.
  static constexpr size_t kEvictLeg = 0;

  FedOp(uint64_t ticket, size_t chunk, std::vector<Leg> legs, const std::vector<OpPtr>& deps);
  static Leg make_leg(Direction dir, Leg::Role role, std::vector<Segment> segments, size_t chunk);

  std::string error() override;
  bool failed() const { return failed_.load(); }
  // Every chunk of every leg queued (or the op failed and will queue no more).
  bool submitted() const { return submitted_.load(); }
  void wait_submitted();
  void fail(const std::string& message);  // keeps the first failure; "transfer N: ..." added

  const uint64_t ticket;
  const size_t chunk;
  std::vector<Leg> legs;
  // The backends' own ops (every op a backend is handed back is one it made).
  const std::vector<std::shared_ptr<FedOp>> deps;

 private:
  friend class Feeders;
  void close_leg();  // a leg will feed no more chunks

  std::mutex mu_;
  std::condition_variable cv_;
  size_t legs_open_;
  std::string error_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> submitted_{false};
};
using FedOpPtr = std::shared_ptr<FedOp>;

// What a backend does with the chunks its feeders hand it. Each method is called on the feeder
// thread of the direction concerned, never under the Feeders lock; may throw (the op then fails).
class ChunkQueue {
 public:
  virtual ~ChunkQueue() = default;
  // First thing on the feeder thread of `dir`; must not throw.
  virtual void feeder_started(Direction dir) = 0;
  // Returns once fewer than `limit` chunks fed on `dir` are unfinished; must not throw.
  virtual void make_room(Direction dir, size_t limit) = 0;
  // Before the first chunk of op.legs[leg]: order it after the op's after_stream and deps.
  virtual void start_leg(const FedOpPtr& op, size_t leg) = 0;
  // Queue (CUDA) or copy (host) chunk `index` of op.legs[leg], made of `pieces`. A fill chunk
  // must also follow chunk `index` of the op's eviction, which was fed before.
  virtual void feed(const FedOpPtr& op, size_t leg, size_t index,
                    const std::vector<Segment>& pieces) = 0;
};

class Feeders {
 public:
  // Starts one thread per direction; `queue` must outlive this object.
  Feeders(ChunkQueue& queue, size_t max_in_flight);
  ~Feeders();
  Feeders(const Feeders&) = delete;
  Feeders& operator=(const Feeders&) = delete;

  void enqueue(const FedOpPtr& op);
  // Feeds everything queued, then ends the threads. Idempotent.
  void stop();
  void record(bool on);
  std::vector<ScheduleEntry> log();

 private:
  struct Queued {
    FedOpPtr op;
    size_t leg;
    size_t deps_seen = 0;  // deps known to be submitted (they stay so)
  };
  void run(Direction dir);
  bool ready(Queued& q);
  // The queued leg of `dir` to feed next, or end(); drops the legs of failed ops.
  std::list<Queued>::iterator choose(Direction dir);

  ChunkQueue& queue_;
  const size_t max_in_flight_;
  std::mutex mu_;
  std::condition_variable cv_;
  // Per direction, in the order legs were last fed: never-fed legs (arrival order) first.
  std::list<Queued> queued_[2];
  size_t never_fed_[2] = {0, 0};  // how many legs at the front of queued_ were never fed
  bool stopping_ = false;
  bool recording_ = false;
  std::vector<ScheduleEntry> log_;
  std::thread threads_[2];  // last: started once everything they use exists
};

}  // namespace hift
