// The feeders (see feeder.h): the scheduling shared by the CUDA and host backends.
#include "feeder.h"

#include <algorithm>

namespace hift {

FedOp::FedOp(uint64_t ticket, size_t chunk, std::vector<Leg> legs, const std::vector<OpPtr>& deps)
    : ticket(ticket),
      chunk(chunk),
      legs(std::move(legs)),
      deps([&] {
        std::vector<FedOpPtr> fed;
        for (const OpPtr& d : deps) fed.push_back(std::static_pointer_cast<FedOp>(d));
        return fed;
      }()),
      legs_open_(this->legs.size()) {}

FedOp::Leg FedOp::make_leg(Direction dir, Leg::Role role, std::vector<Segment> segments,
                           size_t chunk) {
  Leg leg{dir, role, std::move(segments)};
  for (const Segment& s : leg.segments) leg.bytes += s.bytes;
  leg.chunks = (leg.bytes + chunk - 1) / chunk;
  return leg;
}

std::string FedOp::error() {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void FedOp::wait_submitted() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return legs_open_ == 0; });
}

void FedOp::fail(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_.empty()) error_ = "transfer " + std::to_string(ticket) + ": " + message;
  failed_ = true;
}

void FedOp::close_leg() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--legs_open_ == 0) {
    submitted_ = true;
    cv_.notify_all();
  }
}

Feeders::Feeders(ChunkQueue& queue, size_t max_in_flight)
    : queue_(queue), max_in_flight_(max_in_flight) {
  for (int d = 0; d < 2; ++d) threads_[d] = std::thread([this, d] { run(Direction(d)); });
}

Feeders::~Feeders() { stop(); }

void Feeders::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void Feeders::enqueue(const FedOpPtr& op) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < op->legs.size(); ++i) {
      Direction dir = op->legs[i].dir;
      auto& list = queued_[dir];
      list.insert(std::next(list.begin(), never_fed_[dir]++), Queued{op, i});
      if (recording_) log_.push_back({false, op->ticket, dir, 0});
    }
  }
  cv_.notify_all();
}

void Feeders::record(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  if (on) log_.clear();
  recording_ = on;
}

std::vector<ScheduleEntry> Feeders::log() {
  std::lock_guard<std::mutex> lock(mu_);
  return log_;
}

bool Feeders::ready(Queued& q) {
  FedOp& op = *q.op;
  const FedOp::Leg& leg = op.legs[q.leg];
  if (leg.picked == 0) {
    for (; q.deps_seen < op.deps.size(); ++q.deps_seen)
      if (!op.deps[q.deps_seen]->submitted()) return false;
  }
  if (leg.role == FedOp::Leg::kFill) return op.legs[FedOp::kEvictLeg].issued > leg.picked;
  return true;
}

std::list<Feeders::Queued>::iterator Feeders::choose(Direction dir) {
  auto& list = queued_[dir];
  for (auto it = list.begin(); it != list.end();) {
    if (it->op->failed()) {
      // Its other leg stopped, or a dep failed: this leg feeds nothing more. Closing it may
      // complete the op's submission, which the other feeder's legs may wait for.
      if (it->op->legs[it->leg].picked == 0) --never_fed_[dir];
      it->op->close_leg();
      it = list.erase(it);
      cv_.notify_all();
      continue;
    }
    if (ready(*it)) return it;
    ++it;
  }
  return list.end();
}

void Feeders::run(Direction dir) {
  queue_.feeder_started(dir);
  auto& list = queued_[dir];
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (choose(dir) == list.end()) {
      if (stopping_ && list.empty()) return;
      cv_.wait(lock);
      continue;
    }
    // Room first, then choose again: a leg queued while this feeder waited is served next.
    lock.unlock();
    queue_.make_room(dir, max_in_flight_);
    lock.lock();
    auto it = choose(dir);
    if (it == list.end()) continue;  // its op failed meanwhile
    Queued q = *it;
    FedOp& op = *q.op;
    FedOp::Leg& leg = op.legs[q.leg];
    size_t index = leg.picked++;
    bool last = leg.picked == leg.chunks;
    if (index == 0) --never_fed_[dir];
    list.erase(it);
    if (!last) list.push_back(q);  // fed most recently: the back
    std::vector<Segment> pieces;
    for (size_t left = op.chunk; left > 0 && leg.segment < leg.segments.size();) {
      const Segment& s = leg.segments[leg.segment];
      size_t n = std::min(left, s.bytes - leg.offset);
      pieces.push_back({s.dst + leg.offset, s.src + leg.offset, n});
      left -= n;
      leg.offset += n;
      if (leg.offset == s.bytes) {
        ++leg.segment;
        leg.offset = 0;
      }
    }
    if (recording_) log_.push_back({true, op.ticket, dir, index});
    lock.unlock();
    try {
      if (index == 0) {
        for (const FedOpPtr& dep : op.deps)
          if (dep->failed()) throw EngineError("it depends on a transfer that failed: " + dep->error());
        queue_.start_leg(q.op, q.leg);
      }
      queue_.feed(q.op, q.leg, index, pieces);
    } catch (const std::exception& e) {
      op.fail(e.what());
    }
    lock.lock();
    ++leg.issued;
    if (last) op.close_leg();
    // Wake the other feeder when this may have made one of its legs ready: a finished leg (its
    // dependants), an eviction chunk (the fill's next chunk), a failure (legs to drop).
    if (last || leg.role == FedOp::Leg::kEvict || op.failed()) cv_.notify_all();
  }
}

}  // namespace hift
