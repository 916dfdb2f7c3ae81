// rocketrec light-model predictor: load an exported model once (a TorchScript file, or an
// AOTInductor package `.pt2`: the file type is detected), read and check its manifest,
// turn requests into the model's raw inputs and score them.
//
// Thread safety: after construction a Predictor is immutable. predict() and score()
// are const and may be called from any number of threads at once on one shared
// Predictor (TorchScript: each call runs in its own interpreter frame or pooled Static
// Runtime; AOTInductor: each call takes one of the package's `aoti_runners` compiled model
// instances, waiting if all are busy; the weights are shared and only read). For latency,
// give each serving thread one intra-op thread: at::set_num_threads(1) once at start-up,
// and scale with threads, not intra-op.
#pragma once
#include <torch/script.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "request.h"

namespace rocketrec {

// The fused operator's library (deploy/cpp/rocketrec_ops.cpp, CMake target rocketrec_ops).
inline constexpr const char* kOpsLibraryName = "librocketrec_ops.so";

// Makes sure rocketrec's operators are registered: does nothing if the server linked the
// library (or loaded it), else dlopen()s ROCKETREC_OPS_LIBRARY, or librocketrec_ops.so next
// to the executable, or this build's copy. Returns the path it loaded ("" if none was
// needed); throws std::runtime_error naming the library if none loads. The Predictor calls
// it for models whose manifest has an `op_library`; servers that call torch::jit::load
// themselves can call it first.
std::string ensure_ops_library(const std::string& model_path);

// How a Predictor runs the model's methods. kStatic (default): `forward` on Static Runtime
// (torch::jit::StaticModule, with a pool of StaticRuntime instances so that each
// concurrent call has its own), `score_candidates` on the TorchScript interpreter: each
// where it measured faster on the fused module (deploy/README.md, "Latency").
// kInterpreter: both on the interpreter. kStaticAll: both on Static Runtime (for
// comparisons). A method Static Runtime cannot take falls back to the interpreter
// (runtime_of says which runs).
enum class Runtime { kStatic, kInterpreter, kStaticAll };

struct StaticMethod;  // predictor.cpp
struct AotiModels;    // predictor.cpp

// Whether `path` is an AOTInductor package (a PT2 archive) rather than TorchScript.
bool is_aoti_package(const std::string& path);

// Checks every record of a model file (TorchScript and AOTInductor packages are zip
// archives) against the CRC-32 its writer stored: throws std::runtime_error naming the file
// and the damaged record, or saying the file is no model at all. libtorch's loaders do not
// check these (a damaged table would be served with wrong scores). The Predictor calls it
// before loading (it reads the whole file once: about 1 s per GB here), unless the
// environment has ROCKETREC_VERIFY_MODEL=0.
void verify_model_file(const std::string& path);
bool verify_files_enabled();

class Predictor {
 public:
  // Throws std::runtime_error with a clear message if the file cannot be loaded or
  // its manifest is missing, not a rocketrec light model, or its hashes disagree.
  // `runtime` applies to TorchScript files; `aoti_runners` to AOTInductor packages: how
  // many calls may run at once (0: one per hardware thread, at most 16).
  explicit Predictor(const std::string& path, Limits limits = {}, Runtime runtime = Runtime::kStatic,
                     size_t aoti_runners = 0);

  const std::vector<SparseFeatureInfo>& sparse() const { return parser_.sparse(); }
  const std::vector<DenseFeatureInfo>& dense() const { return parser_.dense(); }
  const RequestParser& parser() const { return parser_; }
  const std::string& manifest_text() const { return manifest_text_; }
  // The loaded TorchScript module (read-only use: e.g. a Static Runtime over it); empty
  // for an AOTInductor package.
  const torch::jit::script::Module& module() const { return module_; }
  bool is_aoti() const { return aoti_ != nullptr; }
  // "static", "interpreter" or "aoti": what runs `forward` / `score_candidates`.
  std::string runtime_of(const std::string& method) const;
  // Whether the model runs on the fused operator (its manifest names an op_library).
  bool uses_ops_library() const { return ops_library_; }

  // Parse one JSON line of any form (throws RequestError).
  ParsedLine parse(const std::string& line) const { return parser_.parse(line); }
  // Parse a one-row JSON request (named or {"sparse": {...}, "dense": [...]} form).
  Request parse_request(const std::string& line) const { return parser_.parse_request(line); }

  // Score a batch: one click probability per request. Throws RequestError if a
  // request does not have one bag per sparse input and one value per dense input.
  std::vector<float> predict(const std::vector<Request>& batch) const;

  // Score candidates for one context: one probability per candidate, in order; equals
  // predict() on the merged rows. Each input must be given by the context or by the
  // candidates, not both (RequestError). The context is looked up once.
  std::vector<float> score(const Request& context, const std::vector<Request>& candidates) const;
  std::vector<float> score(const CandidatesRequest& r) const { return score(r.context, r.candidates); }

  // The same from columns (request.h): predict(columns(batch)) == predict(batch), and
  // score(context, columns(candidates)) == score(context, candidates), bit for bit. Throws
  // RequestError, naming the field (and the input and row), when the columns' sizes do
  // not fit the model, a length is negative, or the lengths do not sum to ids' size.
  std::vector<float> predict(const Columns& batch) const;
  std::vector<float> score(const Request& context, const Columns& candidates) const;
  // Requests as columns (checks each request's shape, as predict does).
  Columns columns(const std::vector<Request>& rows) const;
  // The model inputs for a batch: values [N], lengths [I*B] (input-major), dense [B, C].
  std::vector<torch::jit::IValue> inputs(const std::vector<Request>& batch) const;

 private:
  std::vector<torch::jit::IValue> build_inputs(const Request* first, const std::vector<Request>& batch,
                                               bool* overlap = nullptr) const;
  std::vector<torch::jit::IValue> column_inputs(const Request* context, const Columns& c) const;
  torch::jit::script::Module module_;
  std::string manifest_text_;
  RequestParser parser_;
  bool has_candidates_ = false;
  bool ops_library_ = false;
  std::shared_ptr<StaticMethod> static_forward_, static_candidates_;
  std::shared_ptr<AotiModels> aoti_;
  void load_aoti(const std::string& path, size_t runners);
  void warm_up() const;
  at::Tensor run_aoti(bool candidates, std::vector<c10::IValue> in) const;
  std::vector<float> run_candidates(std::vector<c10::IValue> in) const;
  c10::IValue run(const std::shared_ptr<StaticMethod>& sm, const char* method, std::vector<c10::IValue> in) const;
};

// Serves the model that a publish directory's LATEST file names (`rocketrec publish`:
// DIR/LATEST holds a subdirectory name, DIR/<name>/light.pt or light.pt2 the model) and
// swaps to a newly published one between requests: poll() (or the background thread of
// start()) reads LATEST and, when it names another model, loads it completely before
// swapping. A request takes current() once and is scored by that model only, however
// many swaps happen meanwhile (the old model is freed when its last request ends). A
// model that fails to load or to pass its manifest checks is refused: the old one keeps
// serving, and the same name is not retried until LATEST changes again.
class PredictorWatch {
 public:
  // Throws std::runtime_error if DIR/LATEST is missing or its model does not load.
  explicit PredictorWatch(std::string dir, Limits limits = {}, Runtime runtime = Runtime::kStatic,
                          size_t aoti_runners = 0);
  ~PredictorWatch();
  PredictorWatch(const PredictorWatch&) = delete;
  PredictorWatch& operator=(const PredictorWatch&) = delete;

  std::shared_ptr<const Predictor> current() const;
  std::string current_name() const;
  // The current model and its directory name, taken together.
  std::pair<std::shared_ptr<const Predictor>, std::string> snapshot() const;
  // Reads LATEST once: "" if nothing changed, else one line saying what was loaded or why
  // the named model was refused. Never throws.
  std::string poll();
  // Polls every `every` on a background thread, passing each non-empty line to `log`.
  void start(std::chrono::milliseconds every, std::function<void(const std::string&)> log);
  void stop();
  size_t swaps() const { return swaps_; }
  size_t refused() const { return refused_; }

 private:
  std::string dir_;
  Limits limits_;
  Runtime runtime_;
  size_t aoti_runners_;
  mutable std::mutex mu_;
  std::shared_ptr<const Predictor> cur_;
  std::string cur_name_, last_refused_;
  std::atomic<size_t> swaps_{0}, refused_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::string model_path(const std::string& name) const;
  std::string read_latest() const;
};

}  // namespace rocketrec
