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

#include <memory>
#include <mutex>
#include <string>
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

  // The model inputs for a batch: values [N], lengths [I*B] (input-major), dense [B, C].
  std::vector<torch::jit::IValue> inputs(const std::vector<Request>& batch) const;

 private:
  std::vector<torch::jit::IValue> build_inputs(const Request* first, const std::vector<Request>& batch) const;
  torch::jit::script::Module module_;
  std::string manifest_text_;
  RequestParser parser_;
  bool has_candidates_ = false;
  bool ops_library_ = false;
  std::shared_ptr<StaticMethod> static_forward_, static_candidates_;
  std::shared_ptr<AotiModels> aoti_;
  void load_aoti(const std::string& path, size_t runners);
  at::Tensor run_aoti(bool candidates, std::vector<c10::IValue> in) const;
  c10::IValue run(const std::shared_ptr<StaticMethod>& sm, const char* method, std::vector<c10::IValue> in) const;
};

}  // namespace rocketrec
