// rocketrec_predict: score JSON-lines requests with an exported rocketrec light model.
//
//   rocketrec_predict MODEL.pt [REQUESTS.jsonl | -] [--batch N] [--keep-going] [--runtime static|interpreter|static-all]
//                     [--aoti-runners N] [--columns]
//       one probability per line: per one-row request, and per candidate of a
//       {"context": {...}, "candidates": [...]} request, in order. MODEL is a TorchScript
//       file (`rocketrec export`) or an AOTInductor package (`--format aoti`, light.pt2):
//       the type is detected; --runtime applies to TorchScript, --aoti-runners to .pt2;
//       --columns scores through the Predictor's column API (rocketrec::Columns)
//   rocketrec_predict MODEL.pt --bench [--seconds S] [--context a,b] [--candidates N] [--threads T]
//       p50/p99 latency at batch 1/16/256, 1 context x N candidates vs the same N rows
//       as a batch, and requests/s of T threads sharing one Predictor vs 1 thread
//   rocketrec_predict --watch DIR [REQUESTS.jsonl | -] [--batch N] [--keep-going]
//       serve the model DIR/LATEST names (`rocketrec publish`: DIR = RUN/published) and
//       swap to a newly published one between requests (LATEST polled every 100 ms; a
//       model that fails to load is refused and the old one serves on); swaps on stderr
//   rocketrec_predict --watch DIR REQUESTS.jsonl --load-test SECONDS [--threads T]
//       T threads score every request of the file over and over while models swap; per
//       pass one line "MODEL_NAME score..." (one model per pass); a JSON summary on stderr
//   rocketrec_predict --hash STRING...                 fnv1a64 ids, one per line
//   rocketrec_predict --cross-hash ID,ID[,ID...]...    cross ids, one per line
//   rocketrec_predict MODEL.pt --manifest              print the manifest
//   rocketrec_predict MODEL.pt --self-test             the API's size checks
//   rocketrec_predict --bench-math MATH.pt [--seconds S]   the math-only baseline
//       (benchmarks/bench_serving.py): p50/p99 of its forward on prepared inputs
//   rocketrec_predict --bench-paired MODEL... [--math MATH.pt] [--seconds S] [--context a,b]
//       [--candidates N] [--only batch1|batch16|batch256|candidates|candidate_rows|candidates_columns|candidate_rows_columns]
//       [--fold-mb A,B]  (each model once per fold budget: rocketrec::fold_budget_mb)
//       [--lean 0,1]  (each model with score_candidates' lean path off, on: lean_candidates)
//       the models (and the math baseline) timed taking turns in short blocks over the
//       same seconds: ratios between them that the machine's drifting speed cancels out of
//
// --bench times the default runtime (Static Runtime) and the TorchScript interpreter
// (a .pt2: its compiled code; the interpreter figures are -1).
//
// Bad input never crashes: one line "rocketrec_predict: error: FILE:LINE: ..." on stderr
// and exit code 2. With --keep-going a bad line prints "error: ..." in its place on
// stdout and scoring goes on (exit code 1 if any line failed).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "predictor.h"
#include "rocketrec_hash.h"

namespace {

using Clock = std::chrono::steady_clock;

int fail(const std::string& msg) {
  std::cerr << "rocketrec_predict: error: " << msg << std::endl;
  return 2;
}

int usage() {
  std::cerr << "usage: rocketrec_predict MODEL.pt [REQUESTS.jsonl|-] [--batch N] [--keep-going] [--columns] "
               "[--runtime static|interpreter|static-all] [--aoti-runners N]\n"
               "       rocketrec_predict MODEL.pt --bench [--seconds S] [--context a,b] [--candidates N] "
               "[--threads T]\n"
               "       rocketrec_predict --watch DIR [REQUESTS.jsonl|-] [--load-test SECONDS --threads T]\n"
               "       rocketrec_predict MODEL.pt --manifest\n"
               "       rocketrec_predict --bench-math MATH.pt [--seconds S]\n"
               "       rocketrec_predict --bench-paired MODEL... [--math MATH.pt] [--seconds S] [--only KIND] [--fold-mb A,B | --lean A,B]\n"
               "       rocketrec_predict --hash STRING...\n"
               "       rocketrec_predict --cross-hash ID,ID[,ID...]...\n";
  return 2;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

// -- bench ------------------------------------------------------------------------------

struct Gen {
  const rocketrec::Predictor& p;
  std::mt19937_64 rng{42};
  rocketrec::Request row(const std::vector<bool>& skip) {
    rocketrec::Request r;
    r.bags.resize(p.sparse().size());
    std::uniform_real_distribution<float> u(0.0f, 10.0f);
    for (size_t i = 0; i < r.bags.size(); ++i) {
      if (skip[i]) continue;
      const auto& f = p.sparse()[i];
      int n = f.is_list ? static_cast<int>(f.max_ids > 0 ? f.max_ids : 10) : 1;  // full bags
      for (int k = 0; k < n; ++k) r.bags[i].push_back(static_cast<int64_t>(rng() >> 1));
    }
    for (size_t j = 0; j < p.dense().size(); ++j)
      r.dense.push_back(skip[p.sparse().size() + j] ? std::numeric_limits<float>::quiet_NaN() : u(rng));
    return r;
  }
};

// Which inputs a bench's context gives: `context` names them, default every input whose
// name mentions "user"; an unknown name is an error, or ignored when !strict.
std::vector<bool> context_inputs(const rocketrec::Predictor& p, std::vector<std::string> context, bool strict) {
  std::vector<std::string> names;
  for (const auto& f : p.sparse()) names.push_back(f.name);
  for (const auto& f : p.dense()) names.push_back(f.name);
  if (context.empty())
    for (const auto& n : names)
      if (n.find("user") != std::string::npos) context.push_back(n);
  std::vector<bool> in_ctx(names.size(), false);
  for (const auto& c : context) {
    auto it = std::find(names.begin(), names.end(), c);
    if (it == names.end()) {
      if (strict) throw std::runtime_error("--context: unknown input '" + c + "'");
      continue;
    }
    in_ctx[static_cast<size_t>(it - names.begin())] = true;
  }
  return in_ctx;
}

// One context (the inputs in_ctx marks), n candidates (the others), and the same rows merged.
struct Candidates {
  rocketrec::Request ctx;
  std::vector<rocketrec::Request> cands, merged;
};

// A generated row as a request line's JSON object ({"sparse": {...}, "dense": [...]}): string
// inputs get the id's decimal digits as their string (the parser hashes it)
std::string row_json(const rocketrec::Predictor& p, const rocketrec::Request& r) {
  std::string s = "{\"sparse\": {";
  bool first = true;
  for (size_t i = 0; i < r.bags.size(); ++i) {
    if (r.bags[i].empty()) continue;
    const auto& f = p.sparse()[i];
    s += (first ? "\"" : ", \"") + f.name + "\": [";
    first = false;
    for (size_t k = 0; k < r.bags[i].size(); ++k) {
      const std::string id = std::to_string(r.bags[i][k]);
      s += (k ? ", " : "") + (f.is_string ? "\"" + id + "\"" : id);
    }
    s += "]";
  }
  s += "}, \"dense\": [";
  for (size_t k = 0; k < r.dense.size(); ++k) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(r.dense[k]));
    s += (k ? ", " : "") + (std::isnan(r.dense[k]) ? std::string("null") : std::string(buf));
  }
  return s + "]}";
}

// The candidates and the merged rows are parsed from JSON lines by the Predictor's parser,
// as a server gets them (its Requests' heap blocks laid out as parsing leaves them): both
// forms built the same way, so that neither is timed on a tidier heap than the other.
Candidates candidate_requests(const rocketrec::Predictor& p, Gen& gen, const std::vector<bool>& in_ctx, int n) {
  std::vector<bool> not_ctx(in_ctx.size());
  for (size_t i = 0; i < in_ctx.size(); ++i) not_ctx[i] = !in_ctx[i];
  const rocketrec::Request ctx = gen.row(not_ctx);
  std::string line = "{\"context\": " + row_json(p, ctx) + ", \"candidates\": [";
  std::vector<std::string> merged;
  for (int j = 0; j < n; ++j) {
    rocketrec::Request m = gen.row(in_ctx);
    line += (j ? ", " : "") + row_json(p, m);
    for (size_t i = 0; i < m.bags.size(); ++i)
      if (in_ctx[i]) m.bags[i] = ctx.bags[i];
    for (size_t k = 0; k < m.dense.size(); ++k)
      if (in_ctx[p.sparse().size() + k]) m.dense[k] = ctx.dense[k];
    merged.push_back(row_json(p, m));
  }
  rocketrec::ParsedLine pl = p.parse(line + "]}");
  Candidates c;
  c.ctx = std::move(pl.candidates.context);
  c.cands = std::move(pl.candidates.candidates);
  for (const auto& m : merged) c.merged.push_back(p.parse_request(m));
  return c;
}

std::pair<double, double> p50_p99(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  auto pct = [&](double q) { return us[std::min(us.size() - 1, static_cast<size_t>(q * us.size()))]; };
  return {pct(0.5), pct(0.99)};
}

template <class F>
std::pair<double, double> time_it(F&& fn, double seconds) {
  for (int w = 0; w < 20; ++w) fn();
  std::vector<double> us;
  auto start = Clock::now();
  while (us.size() < 20000) {
    auto t0 = Clock::now();
    fn();
    auto t1 = Clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (us.size() >= 50 && std::chrono::duration<double>(t1 - start).count() > seconds) break;
  }
  return p50_p99(std::move(us));
}

int bench(const rocketrec::Predictor& p, const rocketrec::Predictor& pi, const rocketrec::Predictor* pa,
          double seconds, std::vector<std::string> context, int n_cand,
          int threads) {
  at::set_num_threads(1);
  std::vector<bool> in_ctx;
  try {
    in_ctx = context_inputs(p, context, true);
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  if (context.empty())
    for (size_t i = 0; i < in_ctx.size(); ++i)
      if (in_ctx[i])
        context.push_back(i < p.sparse().size() ? p.sparse()[i].name : p.dense()[i - p.sparse().size()].name);
  const std::vector<bool> none(in_ctx.size(), false);
  Gen gen{p};
  // each figure from the default runtime (`p`) and from the TorchScript interpreter (`pi`)
  for (int B : {1, 16, 256}) {
    std::vector<rocketrec::Request> batch;
    for (int b = 0; b < B; ++b) batch.push_back(gen.row(none));
    auto a = p.predict(batch), c = pi.predict(batch);
    double rdiff = 0;
    for (size_t i = 0; i < a.size(); ++i) rdiff = std::max(rdiff, static_cast<double>(std::abs(a[i] - c[i])));
    auto t = time_it([&] { p.predict(batch); }, seconds);
    std::pair<double, double> ti{-1, -1};  // an AOTInductor package has no interpreter
    if (!p.is_aoti()) ti = time_it([&] { pi.predict(batch); }, seconds);
    std::printf(
        "{\"mode\": \"batch\", \"batch\": %d, \"runtime\": \"%s\", \"p50_us\": %.1f, \"p99_us\": %.1f, "
        "\"interpreter_p50_us\": %.1f, \"interpreter_p99_us\": %.1f, \"runtime_max_abs_diff\": %.3g}\n",
        B, p.runtime_of("forward").c_str(), t.first, t.second, ti.first, ti.second, rdiff);
  }
  // one context x n candidates vs the same merged rows as one batch
  auto [ctx, cands, merged] = candidate_requests(p, gen, in_ctx, n_cand);
  auto a = p.score(ctx, cands), b = p.predict(merged);
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, static_cast<double>(std::abs(a[i] - b[i])));
  auto tc = time_it([&] { p.score(ctx, cands); }, seconds);
  auto tb = time_it([&] { p.predict(merged); }, seconds);
  std::pair<double, double> tci{-1, -1}, tcs{-1, -1};
  if (!p.is_aoti()) tci = time_it([&] { pi.score(ctx, cands); }, seconds);
  if (pa && !p.is_aoti()) tcs = time_it([&] { pa->score(ctx, cands); }, seconds);
  std::string ctx_names;
  for (const auto& c : context) ctx_names += (ctx_names.empty() ? "" : ",") + c;
  std::printf(
      "{\"mode\": \"candidates\", \"candidates\": %d, \"context\": \"%s\", \"runtime\": \"%s\", "
      "\"p50_us\": %.1f, \"p99_us\": %.1f, \"batch_p50_us\": %.1f, \"batch_p99_us\": %.1f, "
      "\"interpreter_p50_us\": %.1f, \"static_p50_us\": %.1f, \"max_abs_diff\": %.3g}\n",
      n_cand, ctx_names.c_str(), p.runtime_of("score_candidates").c_str(), tc.first, tc.second, tb.first,
      tb.second, tci.first, tcs.first, diff);
  // requests/s: T threads sharing one Predictor vs 1 thread (context+candidates requests)
  auto rps = [&](int t) {
    std::atomic<long> done{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> pool;
    for (int k = 0; k < t; ++k)
      pool.emplace_back([&] {
        at::set_num_threads(1);
        while (!stop.load(std::memory_order_relaxed)) {
          p.score(ctx, cands);
          done.fetch_add(1, std::memory_order_relaxed);
        }
      });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // warm up
    long d0 = done.load();
    auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    long d1 = done.load();
    double el = std::chrono::duration<double>(Clock::now() - t0).count();
    stop = true;
    for (auto& th : pool) th.join();
    return (d1 - d0) / el;
  };
  // 1 thread and T threads alternately, three times (this VM's speed drifts between two
  // modes over seconds: one pair of measurements read 1.5-2.2 for the same code); each
  // figure is the median of its three, the ratio the median of the three pairs' ratios
  std::vector<double> r1s, rts, ratios;
  for (int k = 0; k < 3; ++k) {
    r1s.push_back(rps(1));
    rts.push_back(rps(threads));
    ratios.push_back(rts.back() / r1s.back());
  }
  auto median3 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[1];
  };
  std::sort(ratios.begin(), ratios.end());
  std::printf("{\"mode\": \"threads\", \"threads\": %d, \"rps\": %.1f, \"rps_1\": %.1f, \"ratio\": %.3f, "
              "\"ratio_min\": %.3f, \"ratio_max\": %.3f}\n",
              threads, median3(rts), median3(r1s), ratios[1], ratios[0], ratios[2]);
  return 0;
}

// --bench-math: a module of the same tower and tables fed already-prepared inputs (table
// rows, offsets, weights, transformed dense), with `example(b)` returning them for b rows
// (benchmarks/bench_serving.py writes it): the cost of the math alone.
int bench_math(const std::string& path, double seconds) {
  at::set_num_threads(1);
  torch::jit::script::Module m;
  try {
    m = torch::jit::load(path);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    return fail(path + ": cannot load: " + msg.substr(0, msg.find('\n')));
  }
  for (int B : {1, 16, 256}) {
    auto ex = m.get_method("example")({static_cast<int64_t>(B)}).toTuple()->elements();
    std::vector<c10::IValue> in(ex.begin(), ex.end());
    auto t = time_it(
        [&] {
          c10::InferenceMode guard;
          return m.forward(in);
        },
        seconds);
    std::printf("{\"mode\": \"math\", \"batch\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f}\n", B, t.first,
                t.second);
  }
  return 0;
}

// --bench-paired: several models timed in the same seconds, for ratios this VM's drifting
// speed does not skew. Per kind (batch 1/16/256, one context x N candidates, the same N
// rows as a batch), the models take turns in short blocks (the first calls of a block
// are warm-up, not timed) until `seconds` have passed; each model's p50/p99 come from
// calls made alongside every other model's. A math baseline (--bench-math's module) is
// timed with them at batch 1/16/256. `only`: one kind (for profiling), "" = all.
struct Timed {
  std::function<void()> fn;
  std::vector<double> us;
};

void paired(std::vector<Timed>& ts, double seconds) {
  constexpr int kBlock = 16, kWarm = 2;
  for (auto& t : ts)
    for (int w = 0; w < 5; ++w) t.fn();
  auto start = Clock::now();
  for (size_t turn = 0;; ++turn) {
    for (size_t k = 0; k < ts.size(); ++k) {
      Timed& t = ts[(turn + k) % ts.size()];  // each model starts a turn in its turn
      for (int i = 0; i < kBlock; ++i) {
        auto t0 = Clock::now();
        t.fn();
        if (i >= kWarm) t.us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
    }
    if (std::chrono::duration<double>(Clock::now() - start).count() > seconds && turn >= 3) break;
  }
}


// `knob` / `values` (--fold-mb A,B,... or --lean A,B): each model is loaded and timed once
// per value of an operator knob (rocketrec::fold_budget_mb: the budget of the first layer
// folded into single-id tables; rocketrec::lean_candidates: score_candidates' lean path on or
// off), set before each call, as "MODEL@fold=A" or "MODEL@lean=A": the knob's effect
// measured in one process.
int bench_paired(const std::vector<std::string>& model_paths, const std::string& math, double seconds,
                 std::vector<std::string> context, int n_cand, const std::string& only,
                 const std::string& knob, const std::vector<int64_t>& values) {
  at::set_num_threads(1);
  std::vector<std::unique_ptr<rocketrec::Predictor>> ps;
  std::vector<std::string> paths;  // the models' names in the output
  std::vector<int64_t> setting;    // per model: the knob's value to set, or -1
  const std::string label = knob == "fold_budget_mb" ? "fold" : "lean";
  for (const auto& path : model_paths)
    for (int64_t f : values.empty() ? std::vector<int64_t>{-1} : values) {
      ps.push_back(std::make_unique<rocketrec::Predictor>(path));
      paths.push_back(f < 0 ? path : path + "@" + label + "=" + std::to_string(f));
      setting.push_back(f);
    }
  std::optional<c10::TypedOperatorHandle<int64_t(int64_t)>> knob_op;
  if (!values.empty())
    knob_op = c10::Dispatcher::singleton().findSchemaOrThrow(("rocketrec::" + knob).c_str(), "").typed<int64_t(int64_t)>();
  auto with_budget = [&](size_t m, std::function<void()> fn) -> std::function<void()> {
    if (setting[m] < 0) return fn;
    const int64_t value = setting[m];
    auto op = *knob_op;
    return [op, value, fn] {
      op.call(value);
      fn();
    };
  };
  torch::jit::script::Module mm;
  if (!math.empty()) mm = torch::jit::load(math);
  auto emit = [&](const std::string& kind, const std::string& name, const std::vector<double>& us) {
    auto [p50, p99] = p50_p99(us);
    std::printf("{\"mode\": \"paired\", \"kind\": \"%s\", \"model\": \"%s\", \"p50_us\": %.2f, \"p99_us\": %.2f, "
                "\"n\": %zu}\n", kind.c_str(), name.c_str(), p50, p99, us.size());
  };
  for (int B : {1, 16, 256}) {
    const std::string kind = "batch" + std::to_string(B);
    if (!only.empty() && only != kind) continue;
    std::vector<std::vector<rocketrec::Request>> batches(ps.size());
    std::vector<Timed> ts;
    for (size_t m = 0; m < ps.size(); ++m) {
      Gen gen{*ps[m]};
      std::vector<bool> none(ps[m]->sparse().size() + ps[m]->dense().size(), false);
      for (int b = 0; b < B; ++b) batches[m].push_back(gen.row(none));
      const rocketrec::Predictor* p = ps[m].get();
      const auto* batch = &batches[m];
      ts.push_back({with_budget(m, [p, batch] { p->predict(*batch); }), {}});
    }
    std::vector<c10::IValue> min;
    if (!math.empty()) {
      auto ex = mm.get_method("example")({static_cast<int64_t>(B)}).toTuple()->elements();
      min.assign(ex.begin(), ex.end());
      ts.push_back({[&] {
                      c10::InferenceMode guard;
                      mm.forward(min);
                    },
                    {}});
    }
    paired(ts, seconds);
    for (size_t m = 0; m < ps.size(); ++m) emit(kind, paths[m], ts[m].us);
    if (!math.empty()) emit(kind, "math:" + math, ts.back().us);
  }
  // one context x N candidates and the same rows as a batch, each as Request rows and as
  // Columns (Predictor::columns: the model's own layout, no heap vector per row)
  const std::vector<std::string> ckinds{"candidates", "candidate_rows", "candidates_columns", "candidate_rows_columns"};
  std::vector<std::string> run_kinds;
  for (const auto& k : ckinds)
    if (only.empty() || only == k) run_kinds.push_back(k);
  if (run_kinds.empty()) return 0;
  std::vector<Timed> ts;
  std::vector<Candidates> cs;
  std::vector<std::pair<rocketrec::Columns, rocketrec::Columns>> cols;  // candidates, merged rows
  for (const auto& p : ps) {
    Gen gen{*p};
    cs.push_back(candidate_requests(*p, gen, context_inputs(*p, context, false), n_cand));
    cols.emplace_back(p->columns(cs.back().cands), p->columns(cs.back().merged));
  }
  for (size_t m = 0; m < ps.size(); ++m) {
    const rocketrec::Predictor* p = ps[m].get();
    const Candidates* c = &cs[m];
    const auto* cc = &cols[m];
    double diff = 0;  // the column forms score what the Request forms score, bit for bit
    auto a = p->score(c->ctx, c->cands), b = p->score(c->ctx, cc->first);
    auto a2 = p->predict(c->merged), b2 = p->predict(cc->second);
    for (size_t i = 0; i < a.size(); ++i)
      diff = std::max({diff, static_cast<double>(std::abs(a[i] - b[i])), static_cast<double>(std::abs(a2[i] - b2[i]))});
    std::printf("{\"mode\": \"paired_columns_check\", \"model\": \"%s\", \"max_abs_diff\": %.3g}\n",
                paths[m].c_str(), diff);
    for (const auto& k : run_kinds) {
      std::function<void()> fn;
      if (k == "candidates") fn = [p, c] { p->score(c->ctx, c->cands); };
      else if (k == "candidate_rows") fn = [p, c] { p->predict(c->merged); };
      else if (k == "candidates_columns") fn = [p, c, cc] { p->score(c->ctx, cc->first); };
      else fn = [p, cc] { p->predict(cc->second); };
      ts.push_back({with_budget(m, fn), {}});
    }
  }
  paired(ts, seconds);
  for (size_t m = 0; m < ps.size(); ++m)
    for (size_t k = 0; k < run_kinds.size(); ++k) emit(run_kinds[k], paths[m], ts[run_kinds.size() * m + k].us);
  return 0;
}

// The library API checks sizes: wrong shapes and overlapping inputs are RequestErrors,
// never reads out of bounds. Prints one line per check; exit 1 if one does not throw.
int self_test(const rocketrec::Predictor& p) {
  const size_t F = p.sparse().size(), D = p.dense().size();
  auto good = [&] {
    rocketrec::Request r;
    r.bags.assign(F, {});
    r.dense.assign(D, std::numeric_limits<float>::quiet_NaN());
    return r;
  };
  std::vector<std::pair<std::string, std::function<void()>>> checks;
  if (F > 0) checks.push_back({"too few bags", [&] { auto r = good(); r.bags.pop_back(); p.predict({r}); }});
  if (D > 0) checks.push_back({"too few dense", [&] { auto r = good(); r.dense.pop_back(); p.predict({r}); }});
  checks.push_back({"too many bags", [&] { auto r = good(); r.bags.emplace_back(); p.predict({r}); }});
  checks.push_back({"too many dense", [&] { auto r = good(); r.dense.push_back(1.f); p.predict({r}); }});
  checks.push_back({"bad candidate", [&] { auto r = good(); auto c = good(); c.bags.resize(F + 1); p.score(r, {c}); }});
  checks.push_back({"bad context", [&] { auto r = good(); r.bags.resize(F + 3); p.score(r, {good()}); }});
  checks.push_back({"overlap", [&] {
    auto r = good(), c = good();
    if (F) { r.bags[0] = {1}; c.bags[0] = {2}; } else { r.dense[0] = 1.f; c.dense[0] = 2.f; }
    p.score(r, {good(), c});
  }});
  // the column forms (rocketrec::Columns): sizes, lengths, ids and overlap checked
  auto cols = [&](int64_t rows) {
    rocketrec::Columns c;
    c.rows = rows;
    c.lengths.assign(F * static_cast<size_t>(rows), 0);
    c.dense.assign(D * static_cast<size_t>(rows), std::numeric_limits<float>::quiet_NaN());
    return c;
  };
  checks.push_back({"columns: lengths size", [&] { auto c = cols(2); c.lengths.push_back(0); p.predict(c); }});
  checks.push_back({"columns: dense size", [&] { auto c = cols(2); c.dense.pop_back(); p.predict(c); }});
  checks.push_back({"columns: negative rows", [&] { auto c = cols(0); c.rows = -1; p.predict(c); }});
  if (F > 0) {
    checks.push_back({"columns: negative length", [&] { auto c = cols(2); c.lengths[1] = -1; c.ids.push_back(1); p.predict(c); }});
    checks.push_back({"columns: lengths past ids", [&] { auto c = cols(2); c.lengths[0] = 3; c.ids = {1, 2}; p.predict(c); }});
    checks.push_back({"columns: ids past lengths", [&] { auto c = cols(2); c.ids = {1}; p.predict(c); }});
  }
  checks.push_back({"columns: bad context", [&] { auto r = good(); r.bags.resize(F + 1); p.score(r, cols(2)); }});
  checks.push_back({"columns: overlap", [&] {
    auto r = good();
    auto c = cols(2);
    if (F) { r.bags[0] = {1}; c.lengths[1] = 1; c.ids = {2}; } else { r.dense[0] = 1.f; c.dense[D] = 2.f; }
    p.score(r, c);
  }});
  int bad = 0;
  for (auto& [name, fn] : checks) {
    try {
      fn();
      std::printf("FAIL %s: no error\n", name.c_str());
      ++bad;
    } catch (const rocketrec::RequestError& e) {
      std::printf("ok %s: %s\n", name.c_str(), e.what());
    }
  }
  auto r = good();
  const float one = p.predict({r}).at(0), col = p.predict(cols(1)).at(0);
  std::printf("ok empty request scores %.6g\n", one);
  if (col != one) {
    std::printf("FAIL columns: an empty row scores %.9g, as a Request %.9g\n", col, one);
    ++bad;
  }
  // the Predictor reuses its input tensors per thread, but only once nothing else holds
  // them: inputs a caller keeps are not written over by the next calls
  auto some = good();
  for (size_t f = 0; f < F; ++f) some.bags[f] = {static_cast<int64_t>(7 * f + 3)};
  for (size_t k = 0; k < D; ++k) some.dense[k] = 1.5f + static_cast<float>(k);
  const auto kept = p.inputs({some, some});
  std::vector<at::Tensor> copies;
  for (const auto& v : kept) copies.push_back(v.toTensor().clone());
  p.predict({r, r, r});
  p.predict(cols(4));
  bool same = true;
  for (size_t i = 0; i < kept.size(); ++i) same = same && kept[i].toTensor().equal(copies[i]);
  std::printf("%s inputs a caller keeps are not reused\n", same ? "ok" : "FAIL");
  bad += same ? 0 : 1;
  return bad ? 1 : 0;
}

}  // namespace

// Scores REQUESTS (a file or - for stdin) line by line: one-row requests in batches of
// `batch_size`, each context+candidates request on its own, in request order. `current`
// gives the model: a batch (and a candidates request) is scored by the model current
// when it started, and a batch is cut where the model changes (--watch). `live`: stdin
// lines are answered at once (an interactive client waits for them).
int serve(const std::function<std::shared_ptr<const rocketrec::Predictor>()>& current,
          const std::string& requests, size_t batch_size, bool keep_going, bool live, bool columns = false) {
  std::ifstream file;
  if (requests != "-") {
    file.open(requests);
    if (!file) return fail(requests + ": cannot open");
  }
  std::istream& in = requests == "-" ? std::cin : file;
  const std::string src = requests == "-" ? "<stdin>" : requests;
  std::shared_ptr<const rocketrec::Predictor> model;  // the batch's model
  std::vector<rocketrec::Request> batch;
  size_t ln = 0, total = 0, bad = 0;
  auto print = [](const std::vector<float>& ps) {
    for (float x : ps) std::printf("%.9g\n", x);
  };
  auto flush = [&]() {
    if (batch.empty()) return;
    print(columns ? model->predict(model->columns(batch)) : model->predict(batch));
    total += batch.size();
    batch.clear();
  };
  for (std::string line; std::getline(in, line);) {
    ++ln;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto now = current();
    if (now != model) {
      flush();
      model = std::move(now);
    }
    try {
      rocketrec::ParsedLine r = model->parse(line);
      if (!r.has_candidates) {
        batch.push_back(std::move(r.row));
        if (batch.size() == batch_size || keep_going || (live && requests == "-")) flush();
      } else {
        flush();  // keep the output in request order
        print(columns ? model->score(r.candidates.context, model->columns(r.candidates.candidates))
                      : model->score(r.candidates));
        total += r.candidates.candidates.size();
      }
      if (live) std::fflush(stdout);
    } catch (const rocketrec::RequestError& e) {
      if (!keep_going) {
        std::fflush(stdout);
        return fail(src + ":" + std::to_string(ln) + ": " + e.what());
      }
      batch.clear();
      ++bad;
      std::string msg = e.what();
      std::replace(msg.begin(), msg.end(), '\n', ' ');
      std::printf("error: %s:%zu: %s\n", src.c_str(), ln, msg.c_str());
    }
  }
  flush();
  if (total == 0 && bad == 0) return fail(src + ": no requests");
  return bad ? 1 : 0;
}

// --watch DIR FILE --load-test S: every thread scores all of FILE's lines per pass with
// the model it took at the pass's start, and prints that model's name and the scores.
int load_test(rocketrec::PredictorWatch& watch, const std::vector<std::string>& lines, double seconds,
              int threads) {
  std::mutex out_mu;  // stdout, shared by the scoring threads (the watcher logs to stderr alone)
  std::atomic<long> passes{0}, errors{0};
  std::atomic<bool> stop{false};
  watch.start(std::chrono::milliseconds(20),
              [](const std::string& line) { std::cerr << "rocketrec_predict: " << line << std::endl; });
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      at::set_num_threads(1);
      while (!stop.load()) {
        auto [model, name] = watch.snapshot();  // this pass: one model, whatever swaps
        std::string out = name;
        try {
          std::vector<rocketrec::Request> rows;
          for (const auto& line : lines) {
            rocketrec::ParsedLine r = model->parse(line);
            if (r.has_candidates) {
              for (float x : model->score(r.candidates)) out += " " + std::to_string(x);
            } else {
              for (float x : model->predict({r.row})) out += " " + std::to_string(x);
            }
          }
        } catch (const std::exception& e) {
          ++errors;
          out += std::string(" error: ") + e.what();
        }
        ++passes;
        std::lock_guard<std::mutex> lock(out_mu);
        std::printf("%s\n", out.c_str());
      }
    });
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& th : pool) th.join();
  watch.stop();
  std::fflush(stdout);
  std::cerr << "{\"passes\": " << passes.load() << ", \"errors\": " << errors.load() << ", \"swaps\": "
            << watch.swaps() << ", \"refused\": " << watch.refused() << "}" << std::endl;
  return errors.load() ? 1 : 0;
}

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return usage();
  if (args[0] == "--hash") {
    for (size_t i = 1; i < args.size(); ++i) std::cout << rocketrec::fnv1a64(args[i]) << "\n";
    return 0;
  }
  if (args[0] == "--cross-hash") {
    try {
      for (size_t i = 1; i < args.size(); ++i) {
        std::vector<int64_t> ids;
        for (const auto& s : split(args[i], ',')) ids.push_back(std::stoll(s));
        std::cout << rocketrec::cross_hash(ids.data(), ids.size()) << "\n";
      }
    } catch (const std::exception&) {
      return fail("--cross-hash takes comma-separated int64 ids");
    }
    return 0;
  }
  if (args[0] == "--bench-paired") {
    std::vector<std::string> paths;
    std::string math, context, only;
    std::vector<int64_t> values;
    std::string knob;
    double secs = 2.0;
    int n_cand = 200;
    for (size_t i = 1; i < args.size(); ++i) {
      const std::string& a = args[i];
      try {
        if (a == "--seconds" && i + 1 < args.size()) secs = std::stod(args[++i]);
        else if (a == "--math" && i + 1 < args.size()) math = args[++i];
        else if (a == "--context" && i + 1 < args.size()) context = args[++i];
        else if (a == "--candidates" && i + 1 < args.size()) n_cand = std::stoi(args[++i]);
        else if (a == "--only" && i + 1 < args.size()) only = args[++i];
        else if ((a == "--fold-mb" || a == "--lean") && i + 1 < args.size()) {
          if (!knob.empty()) return fail("--fold-mb and --lean: one at a time");
          knob = a == "--lean" ? "lean_candidates" : "fold_budget_mb";
          for (const auto& f : split(args[++i], ',')) values.push_back(std::stoll(f));
        } else if (a.rfind("--", 0) == 0) return fail("unknown option " + a);
        else paths.push_back(a);
      } catch (const std::exception&) {
        return fail("bad value for " + a);
      }
    }
    if (paths.empty())
      return fail("--bench-paired MODEL... [--math MATH.pt] [--seconds S] [--only KIND] [--fold-mb A,B | --lean A,B]");
    if (n_cand < 1) return fail("--candidates must be >= 1");
    for (int64_t f : values)
      if (f < 0 || (knob == "lean_candidates" && f > 1))
        return fail(knob == "lean_candidates" ? "--lean takes 0 (off) or 1 (on)" : "--fold-mb takes budgets in MiB >= 0");
    const std::vector<std::string> kinds{"",           "batch1",         "batch16",           "batch256",
                                         "candidates", "candidate_rows", "candidates_columns", "candidate_rows_columns"};
    if (std::find(kinds.begin(), kinds.end(), only) == kinds.end())
      return fail("--only takes batch1, batch16, batch256, candidates, candidate_rows, candidates_columns or candidate_rows_columns");
    try {
      return bench_paired(paths, math, secs, split(context, ','), n_cand, only, knob, values);
    } catch (const std::exception& e) {
      std::string msg = e.what();
      return fail(msg.substr(0, msg.find('\n')));
    }
  }
  if (args[0] == "--bench-math") {
    double secs = 1.0;
    if (args.size() < 2) return fail("--bench-math MATH.pt [--seconds S]");
    if (args.size() >= 4 && args[2] == "--seconds") secs = std::stod(args[3]);
    return bench_math(args[1], secs);
  }
  std::string model = args[0], requests = "-", context, watch_dir;
  bool do_bench = false, manifest = false, keep_going = false, do_self_test = false, columns = false;
  double load_seconds = 0;
  size_t first = 1;
  if (args[0] == "--watch") {
    if (args.size() < 2) return fail("--watch DIR [REQUESTS.jsonl | -]");
    watch_dir = args[1];
    first = 2;
  }
  size_t batch_size = 256;
  double seconds = 1.0;
  int n_cand = 200, threads = 2;
  size_t aoti_runners = 0;
  rocketrec::Runtime runtime = rocketrec::Runtime::kStatic;
  for (size_t i = first; i < args.size(); ++i) {
    const std::string& a = args[i];
    try {
      if (a == "--bench") do_bench = true;
      else if (a == "--load-test" && i + 1 < args.size() && !watch_dir.empty()) load_seconds = std::stod(args[++i]);
      else if (a == "--manifest") manifest = true;
      else if (a == "--keep-going") keep_going = true;
      else if (a == "--columns") columns = true;
      else if (a == "--self-test") do_self_test = true;
      else if (a == "--batch" && i + 1 < args.size()) batch_size = std::stoul(args[++i]);
      else if (a == "--seconds" && i + 1 < args.size()) seconds = std::stod(args[++i]);
      else if (a == "--context" && i + 1 < args.size()) context = args[++i];
      else if (a == "--candidates" && i + 1 < args.size()) n_cand = std::stoi(args[++i]);
      else if (a == "--threads" && i + 1 < args.size()) threads = std::stoi(args[++i]);
      else if (a == "--aoti-runners" && i + 1 < args.size()) aoti_runners = std::stoul(args[++i]);
      else if (a == "--runtime" && i + 1 < args.size()) {
        const std::string r = args[++i];
        if (r != "static" && r != "interpreter" && r != "static-all")
          return fail("--runtime: static, interpreter or static-all, got '" + r + "'");
        runtime = r == "static"        ? rocketrec::Runtime::kStatic
                  : r == "interpreter" ? rocketrec::Runtime::kInterpreter
                                       : rocketrec::Runtime::kStaticAll;
      }
      else if (a.rfind("--", 0) == 0) return fail("unknown option " + a);
      else requests = a;
    } catch (const std::exception&) {
      return fail("bad value for " + a);
    }
  }
  if (batch_size == 0) return fail("--batch must be >= 1");
  if (n_cand < 1 || threads < 1) return fail("--candidates and --threads must be >= 1");
  if (!watch_dir.empty()) {
    try {
      rocketrec::PredictorWatch watch(watch_dir, {}, runtime, aoti_runners);
      std::cerr << "rocketrec_predict: serving " << watch_dir << "/" << watch.current_name() << std::endl;
      if (load_seconds > 0) {
        std::ifstream f(requests);
        if (requests == "-" || !f) return fail("--load-test needs a requests file");
        std::vector<std::string> lines;
        for (std::string line; std::getline(f, line);)
          if (line.find_first_not_of(" \t\r") != std::string::npos) lines.push_back(line);
        return load_test(watch, lines, load_seconds, threads);
      }
      watch.start(std::chrono::milliseconds(100),
                  [](const std::string& line) { std::cerr << "rocketrec_predict: " << line << std::endl; });
      int rc = serve([&] { return watch.current(); }, requests, batch_size, keep_going, true, columns);
      watch.stop();
      return rc;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      return fail(msg.substr(0, msg.find('\n')));
    }
  }
  try {
    const rocketrec::Predictor p(model, {}, runtime, aoti_runners);
    if (manifest) {
      std::cout << p.manifest_text() << std::endl;
      return 0;
    }
    if (do_bench) {
      if (p.is_aoti()) return bench(p, p, nullptr, seconds, split(context, ','), n_cand, threads);
      const rocketrec::Predictor pi(model, {}, rocketrec::Runtime::kInterpreter);
      const rocketrec::Predictor pa(model, {}, rocketrec::Runtime::kStaticAll);
      return bench(p, pi, &pa, seconds, split(context, ','), n_cand, threads);
    }
    if (do_self_test) return self_test(p);
    std::shared_ptr<const rocketrec::Predictor> one(&p, [](const rocketrec::Predictor*) {});
    return serve([&] { return one; }, requests, batch_size, keep_going, false, columns);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    return fail(msg.substr(0, msg.find('\n')));
  }
}
