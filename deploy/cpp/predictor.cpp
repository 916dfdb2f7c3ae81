#include "predictor.h"
#include "reused_tensor.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/runtime/static/impl.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <thread>
#include <unordered_map>

namespace rocketrec {

namespace {

bool ops_registered() {
  return c10::Dispatcher::singleton().findSchema({"rocketrec::light_features", ""}).has_value();
}

std::string exe_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
}

uint32_t le(const unsigned char* p, int n) {  // little-endian, n <= 4 bytes
  uint32_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

bool verify_files_enabled() {
  const char* e = std::getenv("ROCKETREC_VERIFY_MODEL");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

void verify_model_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
  } catch (const std::exception&) {
    throw std::runtime_error(path + ": not a model file: neither a TorchScript file nor an AOTInductor package " +
                             "opens (not a zip archive, or a truncated or damaged one)");
  }
  std::vector<char> buf(size_t{1} << 20);
  for (const std::string& name : reader->getAllRecords()) {
    auto damaged = [&](const std::string& why) {
      return std::runtime_error(path + ": record '" + name + "' is damaged (" + why +
                                "): copy or export the model again");
    };
    const uint64_t header = reader->getRecordHeaderOffset(name), start = reader->getRecordOffset(name),
                   size = reader->getRecordSize(name);
    unsigned char h[30];
    f.seekg(static_cast<std::streamoff>(header));
    if (!f.read(reinterpret_cast<char*>(h), sizeof(h)) || le(h, 4) != 0x04034b50) throw damaged("no zip header");
    if (le(h + 8, 2) != 0) continue;  // compressed (torch writes records stored): not checked
    uint32_t want = le(h + 14, 4);
    if (le(h + 6, 2) & 8) {  // the CRC follows the data (a data descriptor, signature optional)
      unsigned char d[8];
      f.seekg(static_cast<std::streamoff>(start + size));
      if (!f.read(reinterpret_cast<char*>(d), sizeof(d))) throw damaged("the file ends inside it");
      want = le(d, 4) == 0x08074b50 ? le(d + 4, 4) : le(d, 4);
    }
    uLong crc = crc32(0L, Z_NULL, 0);
    f.seekg(static_cast<std::streamoff>(start));
    for (uint64_t left = size; left > 0;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(left, buf.size()));
      if (!f.read(buf.data(), static_cast<std::streamsize>(n))) throw damaged("the file ends inside it");
      crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
      left -= n;
    }
    if (static_cast<uint32_t>(crc) != want) {
      char msg[96];
      std::snprintf(msg, sizeof(msg), "CRC-32 %08x, the archive says %08x", static_cast<uint32_t>(crc), want);
      throw damaged(msg);
    }
  }
}

namespace {

// manifest.json straight from the archive (readable without the op library).
std::string peek_manifest(const std::string& path) {
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    for (const auto& name : reader.getAllRecords())
      if (name == "extra/manifest.json") {
        auto rec = reader.getRecord(name);
        return std::string(static_cast<const char*>(std::get<0>(rec).get()), std::get<1>(rec));
      }
  } catch (const std::exception&) {
  }
  return "";  // torch::jit::load below reports what is wrong with the file
}

}  // namespace

bool is_aoti_package(const std::string& path) {
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    return reader.hasRecord("archive_format") && reader.hasRecord("extra/manifest.json");
  } catch (const std::exception&) {
    return false;
  }
}

std::string ensure_ops_library(const std::string& model_path) {
  if (ops_registered()) return "";
  std::vector<std::string> tried;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ROCKETREC_OPS_LIBRARY")) {
    candidates.push_back(env);  // an explicit choice: nothing else is tried
  } else {
    std::string dir = exe_dir();
    if (!dir.empty()) candidates.push_back(dir + "/" + kOpsLibraryName);
#ifdef ROCKETREC_OPS_BUILD_PATH
    candidates.push_back(ROCKETREC_OPS_BUILD_PATH);
#endif
  }
  std::string last_error;
  for (const auto& c : candidates) {
    tried.push_back(c);
    if (::dlopen(c.c_str(), RTLD_NOW | RTLD_GLOBAL) && ops_registered()) return c;
    const char* err = ::dlerror();
    last_error = err ? err : "loaded, but it registers no rocketrec::light_features";
  }
  std::string where;
  for (const auto& t : tried) where += (where.empty() ? "" : ", ") + t;
  throw std::runtime_error(
      model_path + ": this model runs on rocketrec's fused operator and needs the op library " +
      kOpsLibraryName + ", which is not loaded (tried: " + (where.empty() ? "nothing" : where) +
      (last_error.empty() ? "" : "; " + last_error) +
      "). Link it with -Wl,--no-as-needed, dlopen it before torch::jit::load, or set "
      "ROCKETREC_OPS_LIBRARY; or export the model with --portable");
}

// One StaticModule per method and a pool of StaticRuntime (one per concurrent call: a
// StaticRuntime is not thread-safe, a StaticModule is shared read-only).
struct StaticMethod {
  std::unique_ptr<torch::jit::StaticModule> module;
  std::mutex mu;
  std::vector<std::unique_ptr<torch::jit::StaticRuntime>> free;

  c10::IValue operator()(std::vector<c10::IValue> in) {
    std::unique_ptr<torch::jit::StaticRuntime> rt;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!free.empty()) {
        rt = std::move(free.back());
        free.pop_back();
      }
    }
    if (!rt) rt = std::make_unique<torch::jit::StaticRuntime>(*module);
    c10::IValue out = (*rt)(std::move(in), {});
    std::lock_guard<std::mutex> lock(mu);
    free.push_back(std::move(rt));
    return out;
  }
};

namespace {

// A frozen module's method graph without its (unused) `self` input, or null.
std::shared_ptr<torch::jit::Graph> method_graph(torch::jit::script::Module& m, const std::string& name) {
  auto g = m.get_method(name).graph()->copy();
  if (g->inputs().empty() || !g->inputs()[0]->type()->cast<c10::ClassType>()) return g;
  if (g->inputs()[0]->hasUses()) return nullptr;
  g->eraseInput(0);
  return g;
}

std::shared_ptr<StaticMethod> make_static(torch::jit::script::Module& m, const std::string& name) {
  try {
    auto sm = std::make_shared<StaticMethod>();
    if (name == "forward") {
      sm->module = std::make_unique<torch::jit::StaticModule>(m, /*is_frozen=*/false);
    } else {
      auto g = method_graph(m, name);
      if (!g) return nullptr;
      sm->module = std::make_unique<torch::jit::StaticModule>(g);
    }
    return sm;
  } catch (const std::exception&) {
    return nullptr;  // the interpreter runs it
  }
}

}  // namespace

// An AOTInductor package's two entry points (rocketrec.serving.aoti): each a loader with
// its own pool of compiled model instances, both given the same constant tensors (loaded
// once from the package's data/rocketrec/constants.pt, as `user_managed` constants).
struct AotiModels {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> forward, candidates;
  std::vector<at::Tensor> constants;  // what the loaders were given (user-managed: kept here)
};

namespace {

// A constant of 2 MB or more (the fused embedding tables, whose rows a request reads at
// random) copied onto memory advised for transparent 2 MB pages: on 4 KB pages most
// random rows of a large table also miss the TLB (about 5% of the light tower's time at
// batch 256 here). Best effort: where the kernel's THP is `never` the advice is ignored.
// ROCKETREC_HUGE_PAGES=0 keeps torch's own allocation; =all copies every constant (small
// models too: the tests compare both).
at::Tensor on_huge_pages(const at::Tensor& t) {
  constexpr size_t kHuge = size_t{2} << 20;
  static const std::string mode = [] {
    const char* e = std::getenv("ROCKETREC_HUGE_PAGES");
    return std::string(e != nullptr ? e : "1");
  }();
  const size_t n = t.nbytes();
  if (mode == "0" || (n < kHuge && mode != "all") || n == 0 || !t.is_contiguous() || !t.device().is_cpu())
    return t;
  const size_t cap = (n + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, cap);
  if (p == nullptr) return t;
  ::madvise(p, cap, MADV_HUGEPAGE);
  std::memcpy(p, t.data_ptr(), n);
  return at::from_blob(p, t.sizes(), t.strides(), [](void* q) { std::free(q); }, t.options());
}

}  // namespace

void Predictor::load_aoti(const std::string& path, size_t runners) {
  if (runners == 0) runners = std::min<size_t>(16, std::max(1u, std::thread::hardware_concurrency()));
  auto models = std::make_shared<AotiModels>();
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    auto rec = reader.getRecord("data/rocketrec/constants.pt");
    const char* p = static_cast<const char*>(std::get<0>(rec).get());
    const c10::IValue all = torch::jit::pickle_load(std::vector<char>(p, p + std::get<1>(rec)));
    // both entry points name the same tables: one copy each (keyed by the loaded storage)
    std::unordered_map<const void*, at::Tensor> moved;
    for (const auto& entry : all.toGenericDict()) {
      const std::string name = entry.key().toStringRef();
      auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, name, false, runners);
      std::unordered_map<std::string, at::Tensor> constants;
      for (const auto& c : entry.value().toGenericDict()) {
        const at::Tensor t = c.value().toTensor();
        auto it = moved.find(t.data_ptr());
        if (it == moved.end() || !it->second.sizes().equals(t.sizes()))
          it = moved.insert_or_assign(t.data_ptr(), on_huge_pages(t)).first;
        constants[c.key().toStringRef()] = it->second;
        models->constants.push_back(it->second);
      }
      loader->load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
      (name == "forward" ? models->forward : models->candidates) = std::move(loader);
    }
    if (!models->forward) throw std::runtime_error("no 'forward' entry point");
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg.find("undefined symbol: aoti_torch_cpu_light") != std::string::npos)  // the C shims
      throw std::runtime_error(path + ": this package calls librocketrec_ops.so's C shims, which are not "
                               "visible: load the library with dlopen(path, RTLD_NOW | RTLD_GLOBAL) or link "
                               "it (and build it from the rocketrec that exported the model)");
    throw std::runtime_error(path + ": cannot load AOTInductor package: " + msg.substr(0, msg.find('\n')));
  }
  aoti_ = std::move(models);
}

at::Tensor Predictor::run_aoti(bool candidates, std::vector<c10::IValue> in) const {
  c10::InferenceMode guard;
  std::vector<at::Tensor> t;
  t.reserve(in.size());
  for (auto& v : in) t.push_back(std::move(v).toTensor());
  auto& loader = candidates ? aoti_->candidates : aoti_->forward;
  try {
    return loader->run(t).at(0);
  } catch (const std::exception& e) {  // a failed C shim call: the operator's own message
    using LastError = const char* (*)();
    auto last = reinterpret_cast<LastError>(::dlsym(RTLD_DEFAULT, "rocketrec_ops_last_error"));
    const char* why = last != nullptr ? last() : nullptr;
    if (why != nullptr && *why != '\0') throw std::runtime_error(why);
    throw;
  }
}

std::string Predictor::runtime_of(const std::string& method) const {
  if (aoti_) return "aoti";
  const auto& sm = method == "forward" ? static_forward_ : static_candidates_;
  return sm ? "static" : "interpreter";
}

c10::IValue Predictor::run(const std::shared_ptr<StaticMethod>& sm, const char* method,
                           std::vector<c10::IValue> in) const {
  c10::InferenceMode guard;
  if (sm) return (*sm)(std::move(in));
  // Module methods are not const in the API, but running one only reads the module
  auto& m = const_cast<torch::jit::script::Module&>(module_);
  return m.get_method(method)(std::move(in));
}

Predictor::Predictor(const std::string& path, Limits limits, Runtime runtime, size_t aoti_runners) {
  if (verify_files_enabled()) verify_model_file(path);  // before anything reads it
  const std::string peek = peek_manifest(path);
  if (!peek.empty()) {
    auto j = nlohmann::json::parse(peek, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("format") && j["format"].is_string() &&
        !manifest_format_readable(j["format"].get<std::string>()))  // before loading anything
      throw std::runtime_error(path + ": manifest format '" + j["format"].get<std::string>() +
                               "' is not one this predictor reads (" + kManifestFormatsRead + ")");
    if (!j.is_discarded() && j.is_object() && j.contains("op_library") && j["op_library"].is_object()) {
      ensure_ops_library(path);
      const auto& lib = j["op_library"];
      const int64_t want = lib.value("version", int64_t{-1});
      const int64_t have = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rocketrec::version", "")
                               .typed<int64_t()>()
                               .call();
      if (want != have)
        throw std::runtime_error(path + ": the model needs rocketrec op library version " + std::to_string(want) +
                                 ", the loaded " + kOpsLibraryName + " is version " + std::to_string(have));
      ops_library_ = true;
    }
  }
  if (is_aoti_package(path)) {
    load_aoti(path, aoti_runners);  // after the op library: the compiled code calls it
    manifest_text_ = peek;
    try {
      parser_ = RequestParser::from_manifest(manifest_text_, limits);
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": " + e.what());
    }
    has_candidates_ = aoti_->candidates != nullptr;
    warm_up();
    return;
  }
  torch::jit::ExtraFilesMap extra{{"manifest.json", ""}};
  try {
    module_ = torch::jit::load(path, c10::nullopt, extra);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg.find("rocketrec::") != std::string::npos && !ops_registered())
      throw std::runtime_error(path + ": the model calls rocketrec's fused operator: load " +
                               std::string(kOpsLibraryName) + " first (deploy/README.md)");
    throw std::runtime_error(path + ": cannot load TorchScript model: " + msg.substr(0, msg.find('\n')));
  }
  module_.eval();
  manifest_text_ = extra["manifest.json"];
  if (manifest_text_.empty()) throw std::runtime_error(path + ": no manifest.json inside: not a rocketrec export");
  try {
    parser_ = RequestParser::from_manifest(manifest_text_, limits);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  has_candidates_ = module_.find_method("score_candidates").has_value();
  if (runtime != Runtime::kInterpreter) static_forward_ = make_static(module_, "forward");
  if (runtime == Runtime::kStaticAll && has_candidates_)
    static_candidates_ = make_static(module_, "score_candidates");
  warm_up();
}

// One row with every input missing, before the first request: the fused operator folds the
// first layer into the single-id tables on a model's first call (tens of ms per million
// rows; deploy/README.md), which a request would otherwise wait for.
void Predictor::warm_up() const {
  if (!ops_library_) return;
  Request r;
  r.bags.resize(sparse().size());
  r.dense.assign(dense().size(), std::numeric_limits<float>::quiet_NaN());
  predict({r});
}

// The model inputs' tensors, per thread and slot (0 values, 1 lengths, 2 dense): reused
// from the last call when nothing else holds them (reused_tensor.h)
static at::Tensor input_tensor(int slot, at::IntArrayRef sizes, at::ScalarType type) {
  thread_local at::Tensor cache[3];
  return reused_tensor(cache[slot], sizes, type);
}

std::vector<torch::jit::IValue> Predictor::inputs(const std::vector<Request>& batch) const {
  return build_inputs(nullptr, batch);
}

// Rows [first (if any), batch...] -> values [N], lengths [I*B] (input-major), dense [B, C].
// With a context (`first`), also whether a candidate gives an input the context gives
// (`overlap`; check_disjoint then names it). Pass one reads each request's bag vectors once
// (row by row), keeping each bag's ids pointer beside its length; pass two copies the ids
// input by input from those. Reading every request's bag vectors twice (they are separate
// heap blocks) was a fifth of a 1 x 200 candidates call.
std::vector<torch::jit::IValue> Predictor::build_inputs(const Request* first, const std::vector<Request>& batch,
                                                        bool* overlap) const {
  const int64_t extra = first ? 1 : 0;
  const int64_t B = static_cast<int64_t>(batch.size()) + extra;
  const int64_t F = static_cast<int64_t>(sparse().size());
  const int64_t D = static_cast<int64_t>(dense().size());
  auto row = [&](int64_t b) -> const Request& { return b < extra ? *first : batch[static_cast<size_t>(b - extra)]; };
  // the lengths first (input-major, like a KeyedJaggedTensor), then each input's ids
  auto lengths = input_tensor(1, {F * B}, torch::kInt64);
  auto dense_t = input_tensor(2, {B, D}, torch::kFloat32);
  // restrict: the stores through l and d below cannot change what the loops read
  int64_t* __restrict l = lengths.data_ptr<int64_t>();
  float* __restrict d = dense_t.data_ptr<float>();
  // pass one (row by row) keeps each bag's ids pointer input-major beside its length: pass
  // two (input by input) copies the ids from there, not from each request's bag vectors
  thread_local std::vector<const int64_t*> ptr_v;
  ptr_v.resize(static_cast<size_t>(B * F));
  const int64_t** __restrict ptr = ptr_v.data();
  int64_t given = 0;  // with a context: a candidate's non-empty bag or number where the context gives one
  for (int64_t b = 0; b < B; ++b) {
    const Request& r = row(b);
    if (r.bags.size() != static_cast<size_t>(F) || r.dense.size() != static_cast<size_t>(D))  // names it
      parser_.check_shape(r, b < extra ? std::string("the context")
                                       : (extra ? "candidate " : "request ") + std::to_string(b - extra));
    const std::vector<int64_t>* bags = r.bags.data();
    for (int64_t f = 0; f < F; ++f) {
      ptr[f * B + b] = bags[f].data();
      l[f * B + b] = static_cast<int64_t>(bags[f].size());
    }
    const float* rd = r.dense.data();
    float* db = d + b * D;
    for (int64_t k = 0; k < D; ++k) db[k] = rd[k];
  }
  if (extra) {  // what the context gives, and whether a candidate gives it too (contiguous
                // runs of lengths and dense columns, after the walk: loops that vectorize)
    for (int64_t f = 0; f < F; ++f)
      if (l[f * B] != 0)
        for (int64_t b = 1; b < B; ++b) given |= l[f * B + b];
    for (int64_t k = 0; k < D; ++k)
      if (!std::isnan(d[k]))
        for (int64_t b = 1; b < B; ++b) given |= d[b * D + k] == d[b * D + k];  // not NaN
  }
  if (overlap != nullptr) *overlap = given != 0;
  int64_t total = 0;
  for (int64_t i = 0; i < F * B; ++i) total += l[i];
  auto values = input_tensor(0, {total}, torch::kInt64);
  int64_t* __restrict out = values.data_ptr<int64_t>();
  for (int64_t i = 0; i < F * B; ++i) {  // input-major: each input's ids in row order
    const int64_t n = l[i];
    const int64_t* ids = ptr[i];
    if (n == 1)
      *out = *ids;
    else
      for (int64_t j = 0; j < n; ++j) out[j] = ids[j];  // bags are short: no memmove call per bag
    out += n;
  }
  return {values, lengths, dense_t};
}

static std::vector<float> to_vector(const at::Tensor& t) {
  at::Tensor out = t.contiguous();
  return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.numel());
}

std::vector<float> Predictor::predict(const std::vector<Request>& batch) const {
  if (batch.empty()) return {};
  if (aoti_) return to_vector(run_aoti(false, inputs(batch)));
  return to_vector(run(static_forward_, "forward", inputs(batch)).toTensor());
}

std::vector<float> Predictor::score(const Request& context, const std::vector<Request>& candidates) const {
  if (candidates.empty()) return {};
  if (!has_candidates_)
    throw RequestError("this model file has no score_candidates entry point (exported by an older rocketrec)");
  bool overlap = false;
  auto in = build_inputs(&context, candidates, &overlap);  // row 0 = the context; checks every shape
  if (overlap) parser_.check_disjoint(context, candidates);  // throws, naming the input
  return run_candidates(std::move(in));
}

// score_candidates on the model inputs (row 0 the context). An AOTInductor package is
// compiled for >= 2 candidates: one candidate is scored as two (its row repeated, input
// by input), and the first score kept.
std::vector<float> Predictor::run_candidates(std::vector<c10::IValue> in) const {
  if (!aoti_) return to_vector(run(static_candidates_, "score_candidates", std::move(in)).toTensor());
  const at::Tensor dense = in[2].toTensor();
  if (dense.size(0) != 2) return to_vector(run_aoti(true, std::move(in)));
  const at::Tensor values = in[0].toTensor(), lengths = in[1].toTensor().view({-1, 2});
  std::vector<at::Tensor> ids;
  const int64_t* l = lengths.data_ptr<int64_t>();
  int64_t pos = 0;
  for (int64_t f = 0; f < lengths.size(0); ++f) {  // input f: the context's ids, the candidate's twice
    const int64_t n0 = l[2 * f], n1 = l[2 * f + 1];
    const at::Tensor cand = values.narrow(0, pos + n0, n1);
    ids.insert(ids.end(), {values.narrow(0, pos, n0), cand, cand});
    pos += n0 + n1;
  }
  std::vector<c10::IValue> three{at::cat(ids), at::cat({lengths, lengths.narrow(1, 1, 1)}, 1).reshape({-1}),
                                 at::cat({dense, dense.narrow(0, 1, 1)})};
  return {to_vector(run_aoti(true, std::move(three))).at(0)};
}

// -- Columns ---------------------------------------------------------------------------

Columns Predictor::columns(const std::vector<Request>& rows) const {
  const size_t F = sparse().size(), D = dense().size(), M = rows.size();
  for (size_t b = 0; b < M; ++b)
    if (rows[b].bags.size() != F || rows[b].dense.size() != D) parser_.check_shape(rows[b], "request " + std::to_string(b));
  Columns c;
  c.rows = static_cast<int64_t>(M);
  c.lengths.resize(F * M);
  c.dense.resize(M * D);
  for (size_t f = 0; f < F; ++f)
    for (size_t b = 0; b < M; ++b) {
      const std::vector<int64_t>& bag = rows[b].bags[f];
      c.lengths[f * M + b] = static_cast<int64_t>(bag.size());
      c.ids.insert(c.ids.end(), bag.begin(), bag.end());
    }
  for (size_t b = 0; b < M; ++b) std::copy(rows[b].dense.begin(), rows[b].dense.end(), c.dense.begin() + b * D);
  return c;
}

// Columns (after `context` as row 0, when given) -> values, lengths, dense: the columns are
// the model's layout already, so each input's lengths and ids are one copy each.
std::vector<torch::jit::IValue> Predictor::column_inputs(const Request* context, const Columns& c) const {
  const int64_t F = static_cast<int64_t>(sparse().size()), D = static_cast<int64_t>(dense().size());
  const int64_t M = c.rows, extra = context ? 1 : 0, B = M + extra;
  const std::string what = context ? "candidates" : "columns";
  if (M < 0) throw RequestError(what + ": rows is " + std::to_string(M));
  if (static_cast<int64_t>(c.lengths.size()) != F * M)
    throw RequestError(what + ": lengths has " + std::to_string(c.lengths.size()) + " entries; the model's " +
                       std::to_string(F) + " sparse inputs x " + std::to_string(M) + " rows need " +
                       std::to_string(F * M));
  if (static_cast<int64_t>(c.dense.size()) != M * D)
    throw RequestError(what + ": dense has " + std::to_string(c.dense.size()) + " values; the model's " +
                       std::to_string(D) + " dense inputs x " + std::to_string(M) + " rows need " +
                       std::to_string(M * D));
  if (context && (context->bags.size() != static_cast<size_t>(F) || context->dense.size() != static_cast<size_t>(D)))
    parser_.check_shape(*context, "the context");
  // one pass over the lengths: each input's sum (its ids' count), and the OR of them all:
  // a sign bit means a negative length, a bit from 32 up one longer than any ids vector
  // can be (so the sums of fewer than 2^31 lengths cannot wrap)
  const int64_t* cl = c.lengths.data();
  thread_local std::vector<int64_t> per_v;
  per_v.assign(static_cast<size_t>(F), 0);
  int64_t* per = per_v.data();
  uint64_t bits = 0, sum = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t* lf = cl + f * M;
    int64_t s = 0, o = 0;
    for (int64_t m = 0; m < M; ++m) s += lf[m], o |= lf[m];  // vectorizes
    per[f] = s;
    bits |= static_cast<uint64_t>(o);
    sum += static_cast<uint64_t>(s);
  }
  if ((bits >> 31) != 0 || F * M >= (int64_t{1} << 31))
    for (int64_t i = 0; i < F * M; ++i)
      if (cl[i] < 0 || static_cast<uint64_t>(cl[i]) > c.ids.size())
        throw RequestError(what + ": lengths[" + std::to_string(i) + "] (input '" + sparse()[static_cast<size_t>(i / M)].name +
                           "', row " + std::to_string(i % M) + ") is " + std::to_string(cl[i]) +
                           (cl[i] < 0 ? ": negative" : ": more than ids has"));
  if (sum != static_cast<uint64_t>(c.ids.size()))
    throw RequestError(what + ": lengths sum to " + std::to_string(sum) + " but ids has " +
                       std::to_string(c.ids.size()) + " entries");
  int64_t ctx_ids = 0;
  if (context)
    for (const auto& bag : context->bags) ctx_ids += static_cast<int64_t>(bag.size());
  auto values = input_tensor(0, {static_cast<int64_t>(sum) + ctx_ids}, torch::kInt64);
  auto lengths = input_tensor(1, {F * B}, torch::kInt64);
  auto dense_t = input_tensor(2, {B, D}, torch::kFloat32);
  int64_t* v = values.data_ptr<int64_t>();
  int64_t* l = lengths.data_ptr<int64_t>();
  float* d = dense_t.data_ptr<float>();
  const int64_t* ids = c.ids.data();
  for (int64_t f = 0; f < F; ++f) {  // input by input: the context's bag, then the rows'
    const int64_t n = per[f];
    if (context) {
      const std::vector<int64_t>& bag = context->bags[static_cast<size_t>(f)];
      l[f * B] = static_cast<int64_t>(bag.size());
      std::copy(bag.begin(), bag.end(), v);
      v += bag.size();
      if (!bag.empty() && n != 0)  // an input the context gives: no candidate may give it too
        for (int64_t m = 0; m < M; ++m)
          if (cl[f * M + m] != 0)
            throw RequestError("feature '" + sparse()[static_cast<size_t>(f)].name +
                               "' is given in the context and in candidate " + std::to_string(m));
    }
    std::memcpy(l + f * B + extra, cl + f * M, static_cast<size_t>(M) * sizeof(int64_t));
    std::memcpy(v, ids, static_cast<size_t>(n) * sizeof(int64_t));
    v += n, ids += n;
  }
  if (context) {
    for (int64_t k = 0; k < D; ++k) {
      const float x = context->dense[static_cast<size_t>(k)];
      d[k] = x;
      if (!std::isnan(x))
        for (int64_t m = 0; m < M; ++m)
          if (!std::isnan(c.dense[static_cast<size_t>(m * D + k)]))
            throw RequestError("feature '" + dense()[static_cast<size_t>(k)].name +
                               "' is given in the context and in candidate " + std::to_string(m));
    }
  }
  if (M * D > 0) std::memcpy(d + extra * D, c.dense.data(), static_cast<size_t>(M * D) * sizeof(float));
  return {values, lengths, dense_t};
}

std::vector<float> Predictor::predict(const Columns& batch) const {
  auto in = column_inputs(nullptr, batch);  // checks the columns first, even when empty
  if (batch.rows == 0) return {};
  if (aoti_) return to_vector(run_aoti(false, std::move(in)));
  return to_vector(run(static_forward_, "forward", std::move(in)).toTensor());
}

std::vector<float> Predictor::score(const Request& context, const Columns& candidates) const {
  if (!has_candidates_)
    throw RequestError("this model file has no score_candidates entry point (exported by an older rocketrec)");
  auto in = column_inputs(&context, candidates);  // checks shapes and that no input is given twice
  if (candidates.rows == 0) return {};
  return run_candidates(std::move(in));
}

// -- PredictorWatch ----------------------------------------------------------------------

PredictorWatch::PredictorWatch(std::string dir, Limits limits, Runtime runtime, size_t aoti_runners)
    : dir_(std::move(dir)), limits_(limits), runtime_(runtime), aoti_runners_(aoti_runners) {
  const std::string name = read_latest();
  if (name.empty()) throw std::runtime_error(dir_ + "/LATEST: missing or empty: nothing published yet");
  cur_ = std::make_shared<const Predictor>(model_path(name), limits_, runtime_, aoti_runners_);
  cur_name_ = name;
}

PredictorWatch::~PredictorWatch() { stop(); }

std::string PredictorWatch::read_latest() const {
  std::ifstream f(dir_ + "/LATEST");
  std::string name;
  if (!f || !std::getline(f, name)) return "";
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  return name;
}

std::string PredictorWatch::model_path(const std::string& name) const {
  if (name.find('/') != std::string::npos || name == "." || name == "..")
    throw std::runtime_error(dir_ + "/LATEST: '" + name + "' is not a directory name");
  const std::string base = dir_ + "/" + name + "/";
  std::ifstream pt2(base + "light.pt2");
  return pt2 ? base + "light.pt2" : base + "light.pt";
}

std::shared_ptr<const Predictor> PredictorWatch::current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cur_;
}

std::pair<std::shared_ptr<const Predictor>, std::string> PredictorWatch::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {cur_, cur_name_};
}

std::string PredictorWatch::current_name() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cur_name_;
}

std::string PredictorWatch::poll() {
  const std::string name = read_latest();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (name.empty() || name == cur_name_ || name == last_refused_) return "";
  }
  std::shared_ptr<const Predictor> next;
  std::string path;
  try {
    path = model_path(name);
    next = std::make_shared<const Predictor>(path, limits_, runtime_, aoti_runners_);  // loaded whole first
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mu_);
    last_refused_ = name;
    ++refused_;
    std::string msg = e.what();
    return "refused " + (path.empty() ? name : path) + ": " + msg.substr(0, msg.find('\n')) +
           "; still serving " + cur_name_;
  }
  std::lock_guard<std::mutex> lock(mu_);
  cur_ = std::move(next);  // requests in flight keep the old model until they finish
  cur_name_ = name;
  last_refused_.clear();
  ++swaps_;
  return "now serving " + path;
}

void PredictorWatch::start(std::chrono::milliseconds every, std::function<void(const std::string&)> log) {
  stop();
  stop_ = false;
  thread_ = std::thread([this, every, log] {
    while (!stop_.load()) {
      std::string line = poll();
      if (!line.empty() && log) log(line);
      std::this_thread::sleep_for(every);
    }
  });
}

void PredictorWatch::stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

}  // namespace rocketrec
