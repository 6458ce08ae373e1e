"""The transfer engine (hift_rt._C through hift_rt.engine), on the host backend in CI and on the
CUDA backend where a GPU is present (marker `cuda`).

Every check compares bytes against a sequential model of the same transfers: ordering comes only
from tickets and the engine's own hazard tracking, never from sleeps.
"""
import os
import random
import threading
import time

import pytest
import torch

from hift_rt import _C
from hift_rt.engine import EngineError, TransferEngine, build_info, probe

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def random_bytes(n, gen):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def to_cpu(t):
    return t.cpu() if t.device.type == "cuda" else t.clone()


@pytest.fixture(params=DEVICES)
def engine(request):
    e = TransferEngine(request.param)
    yield e
    e.close()


def test_build_reports_cuda_backend_compiled_and_why_host_is_active():
    info = build_info()
    toolkit = any(os.path.exists(os.path.join(d, "include", "cuda_runtime.h"))
                  for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"))
    if toolkit:
        assert info["cuda_compiled"] is True
        assert info["cuda_runtime_version"] >= 11000
    p = probe()
    if torch.cuda.is_available():
        assert p["backend"] == "cuda" and p["device_name"]
    else:
        assert p["backend"] == "host"
        assert p["reason"].startswith("cuda: no device:") or p["reason"].startswith("built without CUDA")
        assert p["device_name"] is None
        raw = _C.Engine("auto")
        assert raw.backend == "host" and raw.reason == p["reason"]
        raw.close()


def test_info_names_backend_reason_and_build():
    with TransferEngine("cpu") as e:
        info = e.info()
    assert info["backend"] == "host"
    assert info["reason"] == "host backend requested"
    assert "cuda_compiled" in info and info["chunk_bytes"] == _C.DEFAULT_CHUNK_BYTES
    assert info["max_in_flight"] == _C.DEFAULT_MAX_IN_FLIGHT == 2
    with TransferEngine("cpu", chunk_bytes=4096, max_in_flight=3) as e:
        assert (e.chunk_bytes, e.max_in_flight) == (4096, 3)


def disjoint_ranges(rng, count, size, total):
    """`count` non-overlapping (offset, size) ranges inside `total` bytes, `size` bytes or fewer each."""
    cut = sorted(rng.sample(range(total + 1), 2 * count))
    return [(cut[2 * i], min(size, cut[2 * i + 1] - cut[2 * i])) for i in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_interleaved_transfers_match_sequential_model(engine, seed):
    """Hundreds of h2d / d2h / swap ops, single or multi-segment, with random sizes, offsets and
    chunk sizes over several slots and host buffers; the engine may run them in any order its
    tickets allow, the bytes must equal what running them one by one gives."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_slots, slot_bytes, n_host, host_bytes = 4, 96 * 1024 + 13, 5, 160 * 1024 + 7
    slots = [random_bytes(slot_bytes, gen).to(engine.device) for _ in range(n_slots)]
    hosts = [engine.alloc_host(host_bytes) for _ in range(n_host)]
    host_views = [h.view() for h in hosts]
    for v in host_views:
        v.copy_(random_bytes(host_bytes, gen))
    model_slots = [to_cpu(s) for s in slots]
    model_hosts = [v.clone() for v in host_views]
    tickets = []
    for i in range(400):
        kind = rng.choice(["h2d", "d2h", "swap", "h2d segments", "d2h segments"])
        s = rng.randrange(n_slots)
        size = rng.choice([1, 7, 4096, rng.randrange(1, 40 * 1024)])
        chunk = rng.choice([0, 1, 512, 1000, 8192])
        so = rng.randrange(0, slot_bytes - size + 1)
        h = rng.randrange(n_host)
        ho = rng.randrange(0, host_bytes - size + 1)
        dev = slots[s][so:so + size]
        if kind == "h2d":
            tickets.append(engine.h2d(dev, host_views[h][ho:ho + size], chunk_bytes=chunk))
            model_slots[s][so:so + size] = model_hosts[h][ho:ho + size]
        elif kind == "d2h":
            tickets.append(engine.d2h(host_views[h][ho:ho + size], dev, chunk_bytes=chunk))
            model_hosts[h][ho:ho + size] = model_slots[s][so:so + size]
        elif kind == "swap":
            h2 = (h + 1 + rng.randrange(n_host - 1)) % n_host
            fo = rng.randrange(0, host_bytes - size + 1)
            tickets.append(engine.swap(dev, host_views[h][ho:ho + size], host_views[h2][fo:fo + size],
                                       chunk_bytes=chunk))
            old = model_slots[s][so:so + size].clone()
            model_slots[s][so:so + size] = model_hosts[h2][fo:fo + size]
            model_hosts[h][ho:ho + size] = old
        else:
            # 1-4 segments (some empty): destinations apart in one slot or host buffer, sources
            # anywhere (reads may overlap).
            count = rng.randrange(1, 5)
            pieces = [(o, 0 if rng.random() < 0.2 else n)
                      for o, n in disjoint_ranges(rng, count, size // count + 1,
                                                  slot_bytes if kind == "h2d segments" else host_bytes)]
            other = [(rng.randrange(n_host if kind == "h2d segments" else n_slots),
                      rng.randrange(0, (host_bytes if kind == "h2d segments" else slot_bytes) - n + 1))
                     for _, n in pieces]
            if kind == "h2d segments":
                dst = [slots[s][o:o + n] for o, n in pieces]
                src = [host_views[b][o:o + n] for (b, o), (_, n) in zip(other, pieces)]
                tickets.append(engine.h2d(dst, src, chunk_bytes=chunk))
                for (o, n), (b, so2) in zip(pieces, other):
                    model_slots[s][o:o + n] = model_hosts[b][so2:so2 + n]
            else:
                dst = [host_views[h][o:o + n] for o, n in pieces]
                src = [slots[b][o:o + n] for (b, o), (_, n) in zip(other, pieces)]
                tickets.append(engine.d2h(dst, src, chunk_bytes=chunk))
                for (o, n), (b, so2) in zip(pieces, other):
                    model_hosts[h][o:o + n] = model_slots[b][so2:so2 + n]
        if i % 50 == 49:
            # Mid-run check: once nothing in flight touches a range, it must hold the model's bytes.
            h = rng.randrange(n_host)
            engine.wait_tensor(host_views[h])
            assert torch.equal(host_views[h], model_hosts[h]), f"host buffer {h} after op {i}"
            t = rng.choice(tickets)
            engine.wait(t)
            assert engine.query(t)
    engine.synchronize()
    assert engine.in_flight() == 0
    for s in range(n_slots):
        assert torch.equal(to_cpu(slots[s]), model_slots[s]), f"slot {s}"
    for h in range(n_host):
        assert torch.equal(host_views[h], model_hosts[h]), f"host buffer {h}"
    assert all(engine.query(t) for t in tickets)


@pytest.mark.parametrize("nbytes,chunk", [(1, 0), (4097, 1024), (3 * 1024 * 1024 + 5, 4096), (1 << 20, 1 << 20)])
def test_swap_evicts_old_and_fills_new_without_mixture(engine, nbytes, chunk):
    gen = torch.Generator().manual_seed(nbytes)
    old, new = random_bytes(nbytes, gen), random_bytes(nbytes, gen)
    slot = old.clone().to(engine.device)
    evict, fill = engine.alloc_host(nbytes), engine.alloc_host(nbytes)
    fill.view().copy_(new)
    t = engine.swap(slot, evict.view(), fill.view(), chunk_bytes=chunk)
    engine.wait(t)
    assert torch.equal(to_cpu(slot), new)
    assert torch.equal(evict.view(), old)
    assert torch.equal(fill.view(), new)


def test_explicit_deps_order_unrelated_transfers(engine):
    gen = torch.Generator().manual_seed(3)
    a_host, b_host = engine.alloc_host(1 << 22), engine.alloc_host(1024)
    a_host.view().copy_(random_bytes(1 << 22, gen))
    a_dev = torch.empty(1 << 22, dtype=torch.uint8, device=engine.device)
    b_dev = torch.empty(1024, dtype=torch.uint8, device=engine.device)
    ta = engine.h2d(a_dev, a_host.view(), chunk_bytes=4096)
    tb = engine.d2h(b_host.view(), b_dev, deps=[ta])
    engine.wait(tb)
    assert engine.query(ta), "a transfer finished before the ticket it depends on"


def test_stream_wait_orders_compute_after_transfer(engine):
    """wait(ticket, stream): work queued afterwards on the stream sees the transferred bytes, for
    a copy and for both directions of a swap (the slot's new bytes, the evicted old ones)."""
    n = 1 << 20
    host, other = engine.alloc_host(n * 4), engine.alloc_host(n * 4)
    host.view(torch.float32).copy_(torch.arange(n, dtype=torch.float32))
    other.view(torch.float32).fill_(2.0)
    dev = torch.zeros(n, device=engine.device)
    t = engine.h2d(dev, host.view(torch.float32), chunk_bytes=64 * 1024)
    stream = torch.cuda.current_stream() if dev.is_cuda else object()
    engine.wait(t, stream)
    total = (dev * 1).sum()  # queued after the wait
    assert total.item() == float(n * (n - 1) // 2)
    t = engine.swap(dev, host.view(torch.float32), other.view(torch.float32), chunk_bytes=96 * 1024)
    engine.wait(t, stream)
    assert (dev * 1).sum().item() == 2.0 * n
    assert host.view(torch.float32).sum().item() == float(n * (n - 1) // 2)


def test_free_waits_for_transfer_reading_the_buffer(engine):
    """A host buffer freed while a transfer reads it: free blocks until the transfer is done,
    so the destination holds the full data; the freed buffer is unusable afterwards."""
    n = 16 << 20
    gen = torch.Generator().manual_seed(4)
    data = random_bytes(n, gen)
    src = engine.alloc_host(n)
    src.view().copy_(data)
    dst = torch.empty(n, dtype=torch.uint8, device=engine.device)
    src_view = src.view()
    engine.h2d(dst, src_view, chunk_bytes=4096)
    src.free()
    assert torch.equal(to_cpu(dst), data)
    with pytest.raises(ValueError, match="not in a host buffer"):
        engine.h2d(dst[:16], src_view[:16])
    with pytest.raises(ValueError, match="freed"):
        src.view()
    src.free()  # idempotent


def test_reused_buffer_is_written_only_after_readers_finish(engine):
    """Write-after-read on the same host bytes: the d2h into a buffer waits for the h2d that
    reads it, so the h2d carries the old bytes."""
    n = 8 << 20
    gen = torch.Generator().manual_seed(5)
    first, second = random_bytes(n, gen), random_bytes(n, gen)
    host = engine.alloc_host(n)
    host.view().copy_(first)
    a = torch.empty(n, dtype=torch.uint8, device=engine.device)
    b = second.to(engine.device)
    engine.h2d(a, host.view(), chunk_bytes=4096)
    engine.d2h(host.view(), b, chunk_bytes=1 << 20)
    engine.synchronize()
    assert torch.equal(to_cpu(a), first)
    assert torch.equal(host.view(), second)


def test_close_waits_for_in_flight_and_then_refuses(engine):
    n = 16 << 20
    gen = torch.Generator().manual_seed(6)
    data = random_bytes(n, gen)
    host = engine.alloc_host(n)
    host.view().copy_(data)
    dst = torch.empty(n, dtype=torch.uint8, device=engine.device)
    t = engine.h2d(dst, host.view(), chunk_bytes=4096)
    engine.close()
    assert engine.closed
    assert torch.equal(to_cpu(dst), data)
    for call in (lambda: engine.query(t), lambda: engine.wait(t), lambda: engine.alloc_host(8),
                 lambda: engine.counters(), lambda: engine.synchronize()):
        with pytest.raises(EngineError, match="closed"):
            call()
    engine.close()  # idempotent
    host.free()  # no-op after close: the engine already released it


def test_counters_report_bytes_and_busy_time(engine):
    n = 4 << 20
    host_a, host_b = engine.alloc_host(n), engine.alloc_host(n)
    dev = torch.zeros(n, dtype=torch.uint8, device=engine.device)
    engine.reset_counters()
    engine.h2d(dev, host_a.view())
    engine.d2h(host_b.view(), dev)
    engine.swap(dev, host_b.view(), host_a.view(), chunk_bytes=1 << 20)
    engine.synchronize()
    c = engine.counters()
    assert c["h2d"]["bytes"] == 2 * n and c["d2h"]["bytes"] == 2 * n
    assert c["h2d"]["transfers"] == 2 and c["d2h"]["transfers"] == 2
    assert c["h2d"]["busy_seconds"] > 0 and c["d2h"]["busy_seconds"] > 0
    assert c["h2d"]["gb_per_s"] > 0
    engine.reset_counters()
    assert engine.counters()["h2d"]["bytes"] == 0


def test_registered_torch_memory_is_a_host_buffer(engine):
    gen = torch.Generator().manual_seed(7)
    cpu = random_bytes(10000, gen)
    buf = engine.register_host(cpu)
    dev = torch.zeros(10000, dtype=torch.uint8, device=engine.device)
    engine.wait(engine.h2d(dev, cpu))
    assert torch.equal(to_cpu(dev), cpu)
    assert torch.equal(buf.view(), cpu)
    buf.free()
    with pytest.raises(ValueError, match="not in a host buffer"):
        engine.h2d(dev, cpu)


def test_python_threads_share_one_engine():
    """Several Python threads submitting and waiting at once (the GIL is released inside)."""
    errors = []
    with TransferEngine("cpu") as e:
        def work(seed):
            try:
                gen = torch.Generator().manual_seed(seed)
                data = random_bytes(1 << 20, gen)
                host = e.alloc_host(1 << 20)
                host.view().copy_(data)
                dev = torch.empty(1 << 20, dtype=torch.uint8)
                for _ in range(20):
                    e.wait(e.h2d(dev, host.view(), chunk_bytes=1 << 16))
                    e.wait(e.d2h(host.view(), dev, chunk_bytes=1 << 16))
                assert torch.equal(host.view(), data)
                host.free()
            except Exception as exc:  # reported below: assertion errors in threads are lost otherwise
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_multi_segment_transfers_move_every_pair_under_one_ticket(engine):
    """h2d / d2h of lists: the same element range of three state fields that live apart in one host
    buffer, into one device buffer and back, with chunks smaller than, across and larger than a
    segment; one ticket and one counted transfer per call; bytes outside the ranges untouched."""
    gen = torch.Generator().manual_seed(8)
    fields, stride, lo, hi = 3, 4096, 123, 900
    host = engine.alloc_host(fields * stride * 4)
    values = host.view(torch.float32)
    values.copy_(torch.randn(fields * stride, generator=gen))
    before = values.clone()
    host_parts = [values[f * stride + lo:f * stride + hi] for f in range(fields)]
    dev = torch.zeros(fields * (hi - lo), device=engine.device)
    dev_parts = list(dev.split(hi - lo))
    engine.reset_counters()
    for chunk in (0, 100, 1000, 5000):
        dev.zero_()
        engine.wait(engine.h2d(dev_parts, host_parts, chunk_bytes=chunk))
        assert torch.equal(to_cpu(dev), torch.cat(host_parts)), f"chunk {chunk}"
    new = torch.randn(dev.numel(), generator=gen)
    dev.copy_(new)
    engine.wait(engine.d2h(host_parts, dev_parts, chunk_bytes=300))
    expected = before.clone()
    for f, part in enumerate(new.split(hi - lo)):
        expected[f * stride + lo:f * stride + hi] = part
    assert torch.equal(values, expected)
    c = engine.counters()
    assert c["h2d"]["transfers"] == 4 and c["h2d"]["bytes"] == 4 * dev.numel() * 4
    assert c["d2h"]["transfers"] == 1 and c["d2h"]["bytes"] == dev.numel() * 4
    # Empty pairs are skipped; a list of nothing but empty pairs is a 0-byte transfer.
    empty = torch.empty(0, device=engine.device)
    engine.wait(engine.h2d([empty, dev_parts[0]], [values[:0], host_parts[2]]))
    assert torch.equal(to_cpu(dev_parts[0]), host_parts[2])
    assert engine.query(engine.h2d([empty], [values[:0]]))


def test_multi_segment_argument_errors_name_the_pair(engine):
    host = engine.alloc_host(4096)
    v = host.view()
    dev = torch.zeros(64, dtype=torch.uint8, device=engine.device)
    with pytest.raises(ValueError, match="2 dst tensors but 1 src tensors"):
        engine.h2d([dev[:8], dev[8:16]], [v[:8]])
    with pytest.raises(ValueError, match="h2d pair 1: sizes differ"):
        engine.h2d([dev[:8], dev[8:16]], [v[:8], v[8:20]])
    with pytest.raises(ValueError, match=r"d2h src\[1\] must be on"):
        engine.d2h([v[:8], v[8:16]], [dev[:8], torch.zeros(8, dtype=torch.uint8, device="meta")])
    with pytest.raises(ValueError, match=r"h2d src\[0\] must be a tensor"):
        engine.h2d([dev[:8]], [b"12345678"])
    with pytest.raises(ValueError, match="both be tensors or both lists"):
        engine.h2d(dev[:8], [v[:8]])
    outside = torch.zeros(8, dtype=torch.uint8)  # a CPU tensor, not in a host buffer
    with pytest.raises(ValueError, match="h2d segment 1 source .* is not in a host buffer"):
        engine.h2d([dev[:8], dev[8:16]], [v[:8], outside])
    with pytest.raises(ValueError, match="destinations of segments 0 and 1 overlap"):
        engine.h2d([dev[:8], dev[4:12]], [v[:8], v[8:16]])


def test_zero_byte_transfers_are_done_at_once(engine):
    """A transfer of 0 bytes moves nothing and returns a ticket that is already done, whatever its
    (empty) tensors' addresses; its deps are still checked."""
    empty_dev = torch.empty(0, dtype=torch.uint8, device=engine.device)
    empty_host = torch.empty(0, dtype=torch.uint8)
    tickets = [engine.h2d(empty_dev, empty_host), engine.d2h(empty_host, empty_dev),
               engine.swap(empty_dev, empty_host, empty_host), engine.h2d([], [])]
    for t in tickets:
        assert engine.query(t)
        engine.wait(t)
    assert len(set(tickets)) == len(tickets)
    with pytest.raises(ValueError, match="unknown ticket"):
        engine.h2d(empty_dev, empty_host, deps=[tickets[-1] + 100])
    with pytest.raises(ValueError, match="unknown ticket"):
        engine.swap(empty_dev, empty_host, empty_host, deps=[0])


def test_transfer_whose_device_side_overlaps_its_host_side_is_refused():
    """On the host backend a "device" tensor may alias a host buffer. A transfer whose destination
    overlaps its source would give bytes that depend on the chunking: refused, as for a swap."""
    with TransferEngine("cpu") as e:
        v = e.alloc_host(4096).view()
        dev = torch.zeros(64, dtype=torch.uint8)
        with pytest.raises(ValueError, match="h2d destination overlaps the source"):
            e.h2d(v[100:200], v[150:250])
        with pytest.raises(ValueError, match="d2h destination overlaps the source"):
            e.d2h(v[0:100], v[50:150])
        with pytest.raises(ValueError, match="slot overlaps evict_to or fill_from"):
            e.swap(v[0:100], v[50:150], v[1000:1100])
        with pytest.raises(ValueError, match="slot overlaps evict_to or fill_from"):
            e.swap(v[0:100], v[1000:1100], v[99:199])
        with pytest.raises(ValueError, match="segments 0 and 1 overlap"):
            e.h2d([dev[:10], v[5:15]], [v[0:10], v[20:30]])
        # Apart, they run; sources of different segments may overlap (both only read).
        v[100:200].copy_(torch.arange(100, dtype=torch.uint8))
        e.wait(e.h2d(v[0:100], v[100:200]))
        assert torch.equal(v[0:100], v[100:200])
        e.wait(e.h2d([dev[:10], dev[10:20]], [v[0:10], v[5:15]]))
        assert torch.equal(dev[:20], torch.cat([v[0:10], v[5:15]]))


# ---- scheduling and concurrency ----------------------------------------------------------------

def fed_positions(log):
    """{(ticket, direction): positions in the schedule log at which its chunks went to the stream}."""
    positions = {}
    for i, (event, ticket, direction, _) in enumerate(log):
        if event == "fed":
            positions.setdefault((ticket, direction), []).append(i)
    return positions


# These tests need a long transfer still running when a second thread or transfer comes. Each
# checks from the schedule log (or the error it got) that it did, and runs again if the machine
# was so slow that it did not: the check cannot pass by chance, only be inconclusive.
ATTEMPTS = 5


@pytest.mark.parametrize("device", DEVICES)
def test_small_transfers_during_a_long_swap_wait_about_one_chunk(device):
    """A small h2d and a small d2h issued while a swap of 32768 chunks per direction runs are each
    fed after at most one more chunk of the swap in their direction, not after the whole swap (the
    feeders serve the transfer fed least recently first). A transfer that writes bytes the swap
    writes still waits for all of it. Every byte is right."""
    n, chunk = 8 << 20, 256
    gen = torch.Generator().manual_seed(11)
    for _ in range(ATTEMPTS):
        with TransferEngine(device) as e:
            old, new = random_bytes(n, gen), random_bytes(n, gen)
            slot = old.to(device, copy=True)
            evict, fill = e.alloc_host(n), e.alloc_host(n)
            fill.view().copy_(new)
            small_up, small_down = e.alloc_host(4096), e.alloc_host(4096)
            small_up.view().copy_(random_bytes(4096, gen))
            up_dev = torch.zeros(4096, dtype=torch.uint8, device=device)
            down_dev, late_dev = random_bytes(4096, gen).to(device), random_bytes(4096, gen).to(device)
            e.record_schedule()
            swap = e.swap(slot, evict.view(), fill.view(), chunk_bytes=chunk)
            up = e.h2d(up_dev, small_up.view())
            down = e.d2h(small_down.view(), down_dev)
            late = e.d2h(evict.view()[:4096], late_dev)  # writes bytes the swap's eviction writes
            e.synchronize()
            e.record_schedule(False)
            log = e.schedule()
            assert torch.equal(to_cpu(slot), new)
            assert torch.equal(evict.view()[4096:], old[4096:])
            assert torch.equal(evict.view()[:4096], to_cpu(late_dev))
            assert torch.equal(to_cpu(up_dev), small_up.view()) and torch.equal(small_down.view(), to_cpu(down_dev))
        fed = fed_positions(log)
        assert len(fed[swap, "h2d"]) == len(fed[swap, "d2h"]) == n // chunk
        (late_served,) = fed[late, "d2h"]
        assert late_served > max(fed[swap, "d2h"][-1], fed[swap, "h2d"][-1])
        came = {d: log.index(("queued", t, d, 0)) for t, d in ((up, "h2d"), (down, "d2h"))}
        if any(came[d] > fed[swap, d][-1] for d in came):
            continue  # the swap was fed entirely before a small transfer came: inconclusive
        for ticket, direction in ((up, "h2d"), (down, "d2h")):
            (served,) = fed[ticket, direction]
            swap_chunks = fed[swap, direction]
            assert len([i for i in swap_chunks if came[direction] < i < served]) <= 1, direction
            assert swap_chunks[-1] > served, direction
        return
    pytest.fail(f"the swap ended before the small transfers came in all {ATTEMPTS} attempts")


def test_a_waiting_thread_does_not_block_other_callers():
    """While one thread waits for a long transfer, another submits, waits for and queries its own:
    the engine's lock is not held through a wait, so the second transfer is queued and fed between
    the long one's chunks instead of after them."""
    n, chunk = 16 << 20, 64
    for _ in range(ATTEMPTS):
        with TransferEngine("cpu") as e:
            big_src, small_src = e.alloc_host(n), e.alloc_host(64)
            big_dst, small_dst = torch.empty(n, dtype=torch.uint8), torch.empty(64, dtype=torch.uint8)
            e.record_schedule()
            big = e.h2d(big_dst, big_src.view(), chunk_bytes=chunk)
            waiting = threading.Event()

            def waiter():
                waiting.set()
                e.wait(big)

            thread = threading.Thread(target=waiter)
            thread.start()
            waiting.wait()
            time.sleep(0.01)  # let the waiter get into wait(), where it blocks
            small = e.h2d(small_dst, small_src.view())
            e.wait(small)
            assert e.query(small) and e.in_flight() <= 1
            thread.join()
            log = e.schedule()
        fed = fed_positions(log)
        if log.index(("queued", small, "h2d", 0)) > fed[big, "h2d"][-1]:
            continue  # queued after the long transfer: too slow a machine, or the lock was held
        (served,) = fed[small, "h2d"]
        assert fed[big, "h2d"][-1] > served
        return
    pytest.fail(f"the second thread's transfer came after the long one in all {ATTEMPTS} attempts")


def test_free_refuses_new_transfers_while_it_waits_for_old_ones():
    """free() of a buffer a long transfer reads blocks until that transfer is done; meanwhile the
    engine stays usable and a new transfer from the buffer gets a clear error (with the lock held
    through the wait, it would block and then find the buffer gone)."""
    n, chunk = 16 << 20, 64
    gen = torch.Generator().manual_seed(12)
    for _ in range(ATTEMPTS):
        with TransferEngine("cpu") as e:
            src = e.alloc_host(n)
            data = random_bytes(n, gen)
            src.view().copy_(data)
            view = src.view()
            dst = torch.empty(n, dtype=torch.uint8)
            e.h2d(dst, view, chunk_bytes=chunk)
            freer = threading.Thread(target=src.free)
            freer.start()
            probe_dst = torch.empty(16, dtype=torch.uint8)
            while True:  # accepted until free() has begun, refused from then on
                try:
                    e.wait(e.h2d(probe_dst, view[:16]))
                except ValueError as exc:
                    refusal = str(exc)
                    break
            freer.join()
            assert torch.equal(dst, data)
            with pytest.raises(ValueError, match="not in a host buffer"):
                e.h2d(probe_dst, view[:16])
        if "not in a host buffer" in refusal:
            continue  # free() was over before a probe came: too slow a machine, or the lock was held
        assert "is in a host buffer that is being freed" in refusal
        return
    pytest.fail(f"free() was over before a new transfer came in all {ATTEMPTS} attempts")


def test_close_from_two_threads_returns_after_everything_finished():
    n = 16 << 20
    gen = torch.Generator().manual_seed(13)
    e = TransferEngine("cpu")
    src = e.alloc_host(n)
    data = random_bytes(n, gen)
    src.view().copy_(data)
    dst = torch.empty(n, dtype=torch.uint8)
    e.h2d(dst, src.view(), chunk_bytes=64)
    closer = threading.Thread(target=e.close)
    closer.start()
    while not e.closed:
        time.sleep(0.001)
    e.close()  # the first close is still waiting: this one waits for it
    assert torch.equal(dst, data)
    closer.join()


# ---- errors ----------------------------------------------------------------------------------

def test_raw_engine_argument_errors():
    e = _C.Engine("host")
    h = e.alloc_host(1024)
    dev = torch.zeros(1024, dtype=torch.uint8)
    p = dev.data_ptr()
    with pytest.raises(ValueError, match="null pointer"):
        e.h2d(p, 0, 16)
    with pytest.raises(ValueError, match="null pointer"):
        e.h2d(0, h, 16)
    assert e.query(e.h2d(0, 0, 0))  # 0 bytes: nothing to check or move, done at once
    with pytest.raises(ValueError, match="beyond its host buffer"):
        e.h2d(p, h + 1000, 25)
    with pytest.raises(ValueError, match="beyond its host buffer"):
        e.d2h(h, p, 1025)
    with pytest.raises(ValueError, match="not in a host buffer"):
        e.h2d(p, p, 16)
    with pytest.raises(ValueError, match="unknown ticket 0"):
        e.wait(0)
    with pytest.raises(ValueError, match="unknown ticket 99"):
        e.query(99)
    t = e.h2d(p, h, 16)
    with pytest.raises(ValueError, match="unknown ticket"):
        e.h2d(p, h, 16, deps=[t + 5])
    with pytest.raises(ValueError, match="overlap"):
        e.swap(p, h, h + 8, 16)
    with pytest.raises(ValueError, match="not a host buffer allocated by this engine"):
        e.free_host(h + 8)
    with pytest.raises(ValueError, match="overlaps a host buffer"):
        e.register_host(h + 8, 16)
    with pytest.raises(ValueError, match="not memory registered"):
        e.unregister_host(h)
    with pytest.raises(ValueError, match="0 bytes"):
        e.alloc_host(0)
    e.free_host(h)
    with pytest.raises(ValueError, match="not a host buffer allocated by this engine"):
        e.free_host(h)
    e.close()
    with pytest.raises(EngineError, match="closed"):
        e.h2d(p, h, 16)
    assert issubclass(EngineError, RuntimeError)


def test_constructor_errors():
    with pytest.raises(ValueError, match="backend must be"):
        _C.Engine("tpu")
    with pytest.raises(ValueError, match="chunk_bytes"):
        _C.Engine("host", 0, 0)
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        TransferEngine("cpu", max_in_flight=0)
    with pytest.raises(ValueError, match="device must be"):
        _C.Engine("host", -1)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="backend 'cuda' requested but unusable: cuda: no device"):
            _C.Engine("cuda")
    with pytest.raises(ValueError, match="needs backend 'host'"):
        TransferEngine("cpu", backend="cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        TransferEngine("meta")


def test_tensor_level_errors():
    with TransferEngine("cpu") as e:
        h = e.alloc_host(64)
        dev = torch.zeros(64, dtype=torch.uint8)
        with pytest.raises(ValueError, match="sizes differ"):
            e.h2d(dev[:32], h.view())
        with pytest.raises(ValueError, match="contiguous"):
            e.h2d(torch.zeros(8, 8, dtype=torch.uint8).t(), h.view().view(8, 8))
        with pytest.raises(ValueError, match="contiguous"):
            e.register_host(torch.zeros(8, 8).t())
        with pytest.raises(ValueError, match="outside the host buffer"):
            h.view(torch.float32, 0, 17)
        with pytest.raises(ValueError, match="not a multiple"):
            h.view(torch.float32, 2)
        with pytest.raises(ValueError, match="must be on cpu"):
            e.h2d(torch.zeros(64, dtype=torch.uint8, device="meta"), h.view())


@pytest.mark.cuda
def test_cuda_engine_reports_device_and_streams():
    with TransferEngine("cuda") as e:
        assert e.backend == "cuda"
        assert e.info()["device_name"] == torch.cuda.get_device_name()
        assert isinstance(e.h2d_stream, torch.cuda.ExternalStream)
        assert e.h2d_stream.cuda_stream != e.d2h_stream.cuda_stream


@pytest.mark.cuda
def test_cuda_rejects_host_pointer_as_device_side():
    with TransferEngine("cuda") as e:
        h = e.alloc_host(64)
        with pytest.raises(ValueError, match="must be on cuda"):
            e.h2d(torch.zeros(64, dtype=torch.uint8), h.view())
        with pytest.raises(ValueError, match="not device memory"):
            e._engine.h2d(h.ptr, h.ptr, 64)


@pytest.mark.cuda
def test_cuda_device_slot_freed_early_is_not_reused_under_the_copy():
    """A slot dropped right after its transfer is issued keeps its memory until the copy stream
    is done with it (the engine holds a reference until the ticket is done); a new allocation
    cannot clobber the transfer."""
    with TransferEngine("cuda") as e:
        n = 64 << 20
        host = e.alloc_host(n)
        host.view().fill_(7)
        slot = torch.zeros(n, dtype=torch.uint8, device="cuda")
        t = e.d2h(host.view(), slot, chunk_bytes=1 << 20)
        del slot
        other = torch.full((n,), 9, dtype=torch.uint8, device="cuda")
        e.wait(t)
        assert int(host.view().max()) == 0
        del other


@pytest.mark.cuda
def test_cuda_tensor_used_by_a_closed_engine_frees_cleanly():
    """Blocks record_stream-ed on the engine's streams may be freed after close(): the streams
    stay valid for the allocator's events."""
    e = TransferEngine("cuda")
    host = e.alloc_host(1 << 20)
    slot = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    e.wait(e.h2d(slot, host.view()))
    e.close()
    del slot
    again = torch.ones(1 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    assert int(again.sum()) == 1 << 20


def test_views_keep_host_memory_alive_after_free_and_close():
    """A view owns a share of its buffer: free() and close() drop only the engine's share."""
    import gc

    before = _C.live_host_allocations()
    engine = TransferEngine("cpu")
    buf = engine.alloc_host(1 << 16)
    view = buf.view(torch.float32)
    view.fill_(2.5)
    assert _C.live_host_allocations() == before + 1
    buf.free()
    engine.close()
    gc.collect()
    assert _C.live_host_allocations() == before + 1
    assert float(view.sum()) == 2.5 * (1 << 14)
    del view
    gc.collect()
    assert _C.live_host_allocations() == before
    other = TransferEngine("cpu")
    other.alloc_host(4096)
    other.close()
    assert _C.live_host_allocations() == before


def test_engine_bench_runs_on_cpu(capsys):
    """`python -m hift_rt.bench engine` on the host backend: figures come out, and the small-copy
    row, which needs a copy engine shared with torch, says it is not meaningful here."""
    from hift_rt.bench import engine as bench

    rows = bench.run(mib=2, reps=2, device="cpu")
    assert rows["backend"] == "host" and rows["max_in_flight"] == 2
    assert rows["engine_h2d_GBps"] > 0 and rows["engine_swap_GBps_both"] > 0
    assert rows["counters"]["h2d"]["bytes"] > 0 and "small_copies_during_swap" not in rows
    bench._print(rows)
    assert "not meaningful on the host backend" in capsys.readouterr().out
