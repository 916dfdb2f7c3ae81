// rocketrec_predict: score JSON-lines requests with an exported rocketrec light model.
//
//   rocketrec_predict MODEL.pt [REQUESTS.jsonl | -] [--batch N]   one probability per line
//   rocketrec_predict MODEL.pt --bench [--seconds S]              p50/p99 latency, 1 thread
//   rocketrec_predict --hash STRING...                            fnv1a64 ids, one per line
//   rocketrec_predict MODEL.pt --manifest                         print the manifest
//
// Bad input never crashes: one line "rocketrec_predict: error: ..." and exit code 2.
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "predictor.h"
#include "rocketrec_hash.h"

namespace {

int fail(const std::string& msg) {
  std::cerr << "rocketrec_predict: error: " << msg << std::endl;
  return 2;
}

int usage() {
  std::cerr << "usage: rocketrec_predict MODEL.pt [REQUESTS.jsonl|-] [--batch N]\n"
               "       rocketrec_predict MODEL.pt --bench [--seconds S]\n"
               "       rocketrec_predict MODEL.pt --manifest\n"
               "       rocketrec_predict --hash STRING...\n";
  return 2;
}

int bench(rocketrec::Predictor& p, double seconds) {
  at::set_num_threads(1);
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<float> u(0.0f, 10.0f);
  for (int B : {1, 16, 256}) {
    std::vector<rocketrec::Request> batch(B);
    for (auto& r : batch) {
      r.bags.resize(p.sparse().size());
      for (auto& bag : r.bags) {
        int n = 1 + static_cast<int>(rng() % 3);
        for (int k = 0; k < n; ++k) bag.push_back(static_cast<int64_t>(rng() >> 1));
      }
      for (size_t j = 0; j < p.dense().size(); ++j) r.dense.push_back(u(rng));
    }
    for (int w = 0; w < 20; ++w) p.predict(batch);
    std::vector<double> us;
    auto start = std::chrono::steady_clock::now();
    while (us.size() < 20000) {
      auto t0 = std::chrono::steady_clock::now();
      p.predict(batch);
      auto t1 = std::chrono::steady_clock::now();
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      if (us.size() >= 50 && std::chrono::duration<double>(t1 - start).count() > seconds) break;
    }
    std::sort(us.begin(), us.end());
    auto pct = [&](double q) { return us[std::min(us.size() - 1, static_cast<size_t>(q * us.size()))]; };
    std::printf("{\"batch\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f, \"iters\": %zu}\n", B, pct(0.5), pct(0.99),
                us.size());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return usage();
  if (args[0] == "--hash") {
    for (size_t i = 1; i < args.size(); ++i) std::cout << rocketrec::fnv1a64(args[i]) << "\n";
    return 0;
  }
  std::string model = args[0], requests = "-";
  bool do_bench = false, manifest = false;
  size_t batch_size = 256;
  double seconds = 1.0;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    try {
      if (a == "--bench") do_bench = true;
      else if (a == "--manifest") manifest = true;
      else if (a == "--batch" && i + 1 < args.size()) batch_size = std::stoul(args[++i]);
      else if (a == "--seconds" && i + 1 < args.size()) seconds = std::stod(args[++i]);
      else if (a.rfind("--", 0) == 0) return fail("unknown option " + a);
      else requests = a;
    } catch (const std::exception&) {
      return fail("bad value for " + a);
    }
  }
  if (batch_size == 0) return fail("--batch must be >= 1");
  try {
    rocketrec::Predictor p(model);
    if (manifest) {
      std::cout << p.manifest_text() << std::endl;
      return 0;
    }
    if (do_bench) return bench(p, seconds);
    std::ifstream file;
    if (requests != "-") {
      file.open(requests);
      if (!file) return fail(requests + ": cannot open");
    }
    std::istream& in = requests == "-" ? std::cin : file;
    const std::string src = requests == "-" ? "<stdin>" : requests;
    std::vector<rocketrec::Request> batch;
    std::string line;
    size_t ln = 0, total = 0;
    auto flush = [&]() {
      if (batch.empty()) return;
      for (float x : p.predict(batch)) std::printf("%.9g\n", x);
      total += batch.size();
      batch.clear();
    };
    while (std::getline(in, line)) {
      ++ln;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      try {
        batch.push_back(p.parse_request(line));
      } catch (const rocketrec::RequestError& e) {
        std::fflush(stdout);
        return fail(src + ":" + std::to_string(ln) + ": " + e.what());
      }
      if (batch.size() == batch_size) flush();
    }
    flush();
    if (total == 0) return fail(src + ": no requests");
    return 0;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    return fail(msg.substr(0, msg.find('\n')));
  }
}
