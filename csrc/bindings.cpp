// hift_rt._C: the C++ boundary. Private; hift_rt.engine is the Python layer over it.
// Argument errors raise ValueError (std::invalid_argument), engine and CUDA failures raise
// hift_rt._C.EngineError (a RuntimeError). Every call that can block releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "engine.h"

namespace py = pybind11;
using hift::Engine;

namespace {

// A writable byte range of engine host memory that owns a share of it (see Engine::host_view).
struct HostView {
  std::shared_ptr<void> keep;
  uintptr_t ptr;
  size_t bytes;
};

py::dict counters_dict(const hift::Counters& c) {
  py::dict d;
  const char* names[2] = {"h2d", "d2h"};
  for (int i = 0; i < 2; ++i) {
    py::dict one;
    one["bytes"] = c.bytes[i];
    one["busy_seconds"] = c.busy_seconds[i];
    one["transfers"] = c.transfers[i];
    d[names[i]] = one;
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hift_rt transfer engine (private; use hift_rt.engine)";
  py::register_exception<hift::EngineError>(m, "EngineError", PyExc_RuntimeError);
  m.attr("DEFAULT_CHUNK_BYTES") = hift::kDefaultChunkBytes;
  m.attr("DEFAULT_MAX_IN_FLIGHT") = hift::kDefaultMaxInFlight;

  m.def("build_info", [] {
    py::dict d;
    d["cuda_compiled"] = hift::built_with_cuda();
    d["cuda_runtime_version"] = hift::cuda_runtime_version();
    d["default_chunk_bytes"] = hift::kDefaultChunkBytes;
    return d;
  }, "How this module was built: CUDA backend compiled in or not, cudart version.");

  m.def("live_host_allocations", &hift::live_host_allocations,
        "Host buffers allocated by any engine and not yet released (by the engine and every view).");

  py::class_<HostView>(m, "HostView", py::buffer_protocol())
      .def_buffer([](HostView& v) {
        return py::buffer_info(reinterpret_cast<void*>(v.ptr), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(v.bytes)}, {1}, false);
      });

  m.def("probe", [](int device) {
    hift::Probe p;
    {
      py::gil_scoped_release release;
      p = hift::probe(device);
    }
    py::dict d;
    d["backend"] = p.backend;
    d["reason"] = p.reason;
    d["device_name"] = p.device_name.empty() ? py::object(py::none()) : py::str(p.device_name);
    d["device_count"] = p.device_count;
    return d;
  }, py::arg("device") = 0, "Which backend 'auto' picks on this machine and why.");

  using Deps = std::vector<uint64_t>;
  using Stream = std::optional<uintptr_t>;
  using Triples = std::vector<std::tuple<uintptr_t, uintptr_t, size_t>>;
  auto release = py::call_guard<py::gil_scoped_release>();
  auto segments = [](const Triples& triples) {
    std::vector<hift::Segment> out;
    for (auto& [dst, src, n] : triples) out.push_back({dst, src, n});
    return out;
  };

  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::string&, int, size_t, size_t>(), py::arg("backend") = "auto",
           py::arg("device") = 0, py::arg("chunk_bytes") = hift::kDefaultChunkBytes,
           py::arg("max_in_flight") = hift::kDefaultMaxInFlight, release)
      .def_property_readonly("backend", &Engine::backend)
      .def_property_readonly("reason", &Engine::reason)
      .def_property_readonly("device_name", &Engine::device_name)
      .def_property_readonly("device", &Engine::device)
      .def_property_readonly("chunk_bytes", &Engine::chunk_bytes)
      .def_property_readonly("max_in_flight", &Engine::max_in_flight)
      .def_property_readonly("closed", &Engine::closed)
      .def("streams", &Engine::streams, release)
      .def("alloc_host", &Engine::alloc_host, py::arg("nbytes"), release)
      .def("free_host", &Engine::free_host, py::arg("ptr"), release)
      .def("register_host", &Engine::register_host, py::arg("ptr"), py::arg("nbytes"), release)
      .def("unregister_host", &Engine::unregister_host, py::arg("ptr"), release)
      .def("host_view", [](Engine& e, uintptr_t ptr, size_t nbytes) {
        return HostView{e.host_view(ptr, nbytes), ptr, nbytes};
      }, py::arg("ptr"), py::arg("nbytes"), release,
         "Bytes [ptr, ptr + nbytes) of a host buffer as a buffer-protocol object that keeps the "
         "memory alive (torch.frombuffer wraps it), even after free_host or close.")
      .def("h2d", [](Engine& e, uintptr_t dst, uintptr_t src, size_t n, const Deps& deps, Stream after,
                     size_t chunk) { return e.copy(hift::kH2D, {{dst, src, n}}, deps, after, chunk); },
           py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("deps") = Deps{},
           py::arg("after_stream") = Stream{}, py::arg("chunk_bytes") = 0, release)
      .def("d2h", [](Engine& e, uintptr_t dst, uintptr_t src, size_t n, const Deps& deps, Stream after,
                     size_t chunk) { return e.copy(hift::kD2H, {{dst, src, n}}, deps, after, chunk); },
           py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("deps") = Deps{},
           py::arg("after_stream") = Stream{}, py::arg("chunk_bytes") = 0, release)
      .def("h2d_segments", [segments](Engine& e, const Triples& t, const Deps& deps, Stream after,
                                      size_t chunk) { return e.copy(hift::kH2D, segments(t), deps, after, chunk); },
           py::arg("segments"), py::arg("deps") = Deps{}, py::arg("after_stream") = Stream{},
           py::arg("chunk_bytes") = 0, release,
           "One h2d transfer of several (dst, src, nbytes) segments: one ticket, one op.")
      .def("d2h_segments", [segments](Engine& e, const Triples& t, const Deps& deps, Stream after,
                                      size_t chunk) { return e.copy(hift::kD2H, segments(t), deps, after, chunk); },
           py::arg("segments"), py::arg("deps") = Deps{}, py::arg("after_stream") = Stream{},
           py::arg("chunk_bytes") = 0, release,
           "One d2h transfer of several (dst, src, nbytes) segments: one ticket, one op.")
      .def("swap", &Engine::swap, py::arg("slot"), py::arg("evict_to"), py::arg("fill_from"),
           py::arg("nbytes"), py::arg("deps") = Deps{}, py::arg("after_stream") = Stream{},
           py::arg("chunk_bytes") = 0, release)
      .def("query", &Engine::query, py::arg("ticket"), release)
      .def("wait", &Engine::wait, py::arg("ticket"), release)
      .def("wait_stream", &Engine::wait_stream, py::arg("ticket"), py::arg("stream"), release)
      .def("wait_range", &Engine::wait_range, py::arg("ptr"), py::arg("nbytes"), release)
      .def("synchronize", &Engine::synchronize, release)
      .def("in_flight", &Engine::in_flight, release)
      .def("counters", [](Engine& e) {
        hift::Counters c;
        {
          py::gil_scoped_release r;
          c = e.counters();
        }
        return counters_dict(c);
      })
      .def("reset_counters", &Engine::reset_counters, release)
      .def("record_schedule", &Engine::record_schedule, py::arg("on"), release,
           "True: clear the schedule log and record; False: stop recording.")
      .def("schedule", [](Engine& e) {
        std::vector<hift::ScheduleEntry> log;
        {
          py::gil_scoped_release r;
          log = e.schedule();
        }
        py::list out;
        for (const auto& s : log)
          out.append(py::make_tuple(s.fed ? "fed" : "queued", s.ticket, s.dir == hift::kH2D ? "h2d" : "d2h",
                                    s.chunk));
        return out;
      }, "The schedule log: (\"queued\" | \"fed\", ticket, \"h2d\" | \"d2h\", chunk index), in feed order.")
      .def("close", &Engine::close, release);
}
